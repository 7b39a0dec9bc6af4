"""Attention over the paged KV cache, behind a small backend seam.

The engine describes a forward step with a backend-neutral `StepLayout` (which tokens are new, where
their KV goes, which blocks each sequence owns). A backend turns the layout into whatever metadata
its kernels want once per step (`build_metadata`), then each layer calls `attend` with that
metadata. The torch backend here is exact and simple (SDPA per prompt for prefill, a gather of each
sequence's blocks for decode); a GPU backend (flash/paged kernels, CUDA graphs) replaces it by
implementing the same two methods and being passed to `Engine(..., attention_backend=...)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StepLayout:
    """One forward step: `seq_lens[i]` new tokens of sequence i, packed in order, no padding.

    `context_lens[i]` counts sequence i's tokens in the cache after this step (new ones included);
    `slot_mapping` is the flat cache slot (block * block_size + offset) of every new token.
    """

    is_prefill: bool
    seq_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: list[int]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.slot_mapping)


@dataclass
class LayerKV:
    """One layer's cache: K and V of shape [num_blocks, block_size, kv_heads, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor


class AttentionBackend(ABC):
    """What the engine needs from an attention implementation."""

    name: str = "abstract"

    @abstractmethod
    def build_metadata(self, layout: StepLayout, device: torch.device) -> Any:
        """Per-step tensors shared by all layers (called once per forward)."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV, meta: Any,
               scale: float) -> torch.Tensor:
        """Store the new k, v [T, kv_heads, D] in `cache`, then attend q [T, heads, D] -> [T, heads, D]."""


@dataclass
class TorchPrefillMeta:
    slots: torch.Tensor
    bounds: list[tuple[int, int]]


@dataclass
class TorchDecodeMeta:
    slots: torch.Tensor
    gather: torch.Tensor  # [B, max_ctx] cache slots of each sequence's context, padded with slot 0
    mask: torch.Tensor | None  # [B, 1, 1, max_ctx] True where a key is real; None when no padding


class TorchAttentionBackend(AttentionBackend):
    """Reference backend in plain PyTorch: exact on CPU, correct (not fast) on GPU."""

    name = "torch"

    def build_metadata(self, layout: StepLayout, device: torch.device) -> TorchPrefillMeta | TorchDecodeMeta:
        slots = torch.tensor(layout.slot_mapping, dtype=torch.long, device=device)
        if layout.is_prefill:
            if layout.context_lens != layout.seq_lens:
                raise ValueError("the torch backend prefills whole prompts only (no cached prefix)")
            bounds, start = [], 0
            for n in layout.seq_lens:
                bounds.append((start, start + n))
                start += n
            return TorchPrefillMeta(slots=slots, bounds=bounds)
        bs = layout.block_size
        max_ctx = max(layout.context_lens)
        gather = torch.zeros(len(layout.context_lens), max_ctx, dtype=torch.long)
        for i, (ctx, table) in enumerate(zip(layout.context_lens, layout.block_tables, strict=True)):
            pos = torch.arange(ctx)
            blocks = torch.tensor(table[: (ctx + bs - 1) // bs], dtype=torch.long)
            gather[i, :ctx] = blocks[pos // bs] * bs + pos % bs
        lens = torch.tensor(layout.context_lens)
        mask = None
        if bool((lens != max_ctx).any()):
            mask = (torch.arange(max_ctx)[None, :] < lens[:, None])[:, None, None, :].to(device)
        return TorchDecodeMeta(slots=slots, gather=gather.to(device), mask=mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
               meta: TorchPrefillMeta | TorchDecodeMeta, scale: float) -> torch.Tensor:
        heads, kv_heads, dim = q.shape[1], k.shape[1], k.shape[2]
        flat_k = cache.keys.view(-1, kv_heads, dim)
        flat_v = cache.values.view(-1, kv_heads, dim)
        flat_k.index_copy_(0, meta.slots, k)
        flat_v.index_copy_(0, meta.slots, v)
        gqa = heads != kv_heads
        if isinstance(meta, TorchPrefillMeta):
            out = torch.empty_like(q)
            # One SDPA per prompt: causal attention with no padding FLOPs; the GPU backend batches varlen.
            for start, end in meta.bounds:
                out[start:end] = F.scaled_dot_product_attention(
                    q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                    is_causal=True, scale=scale, enable_gqa=gqa,
                ).transpose(0, 1)
            return out
        keys = flat_k[meta.gather].transpose(1, 2)  # [B, kv_heads, ctx, D]
        values = flat_v[meta.gather].transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=meta.mask, scale=scale,
                                             enable_gqa=gqa)
        return out[:, :, 0, :]


@dataclass
class AttentionContext:
    """What a model's attention layers receive for one step: the backend, its metadata, the caches."""

    backend: AttentionBackend
    meta: Any
    caches: list[LayerKV]
    # Called with the layer index once a layer stored its KV (engine/kv_export.py stages it for export).
    after_layer: Callable[[int], None] | None = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        out = self.backend.attend(q, k, v, self.caches[layer_idx], self.meta, scale)
        if self.after_layer is not None:
            self.after_layer(layer_idx)
        return out
