"""Attention backend for the model-agnostic GPU path: FlashAttention-2 varlen prefill, Triton paged decode.

The fused Llama runner covers the common case; this backend serves every other model and shard on a
GPU (OPT, tensor-parallel shards whose row-parallel layers all-reduce inside DeepSpeed's modules)
through the engine's attention seam, so they also avoid the torch backend's per-step gather of every
sequence's whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...kernels import paged_decode_attention, varlen_causal_attention
from ..attention import AttentionBackend, LayerKV, StepLayout


@dataclass
class GpuPrefillMeta:
    slots: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    max_seqlen: int


@dataclass
class GpuDecodeMeta:
    slots: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, widest table]
    context_lens: torch.Tensor  # int32 [B]


class GpuAttentionBackend(AttentionBackend):
    """Prefill: one varlen flash launch for the packed prompts. Decode: the paged Triton kernel."""

    name = "gpu"

    def build_metadata(self, layout: StepLayout, device: torch.device) -> GpuPrefillMeta | GpuDecodeMeta:
        slots = torch.tensor(layout.slot_mapping, dtype=torch.long).to(device, non_blocking=True)
        if layout.is_prefill:
            if layout.context_lens != layout.seq_lens:
                raise ValueError("the GPU backend prefills whole prompts only (no cached prefix)")
            cu = np.zeros(len(layout.seq_lens) + 1, dtype=np.int32)
            np.cumsum(layout.seq_lens, out=cu[1:])
            return GpuPrefillMeta(slots, torch.from_numpy(cu).to(device), max(layout.seq_lens))
        width = max(len(t) for t in layout.block_tables)
        tables = np.zeros((len(layout.block_tables), width), dtype=np.int32)
        for i, table in enumerate(layout.block_tables):
            tables[i, :len(table)] = table
        return GpuDecodeMeta(slots, torch.from_numpy(tables).to(device),
                             torch.tensor(layout.context_lens, dtype=torch.int32).to(device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
               meta: GpuPrefillMeta | GpuDecodeMeta, scale: float) -> torch.Tensor:
        kv_heads, dim = k.shape[1], k.shape[2]
        cache.keys.view(-1, kv_heads, dim).index_copy_(0, meta.slots, k)
        cache.values.view(-1, kv_heads, dim).index_copy_(0, meta.slots, v)
        if isinstance(meta, GpuPrefillMeta):
            return varlen_causal_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
        return paged_decode_attention(q, cache.keys, cache.values, meta.block_tables, meta.context_lens, scale)
