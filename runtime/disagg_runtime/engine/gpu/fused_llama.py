"""Llama forward on fused weights and the `kernels` package: the engine's fast path on a GPU.

The model built by `models/` keeps HF's separate q/k/v and gate/up projections (checkpoints load by
name, DeepSpeed AutoTP shards them). Here each layer's q|k|v and gate|up weights are concatenated once
so a step runs 4 matmuls per layer instead of 7, and the original parameters are re-pointed at
slices of the fused tensors, so nothing is held twice and the module tree still works. Norms, RoPE,
the KV store and SwiGLU are fused Triton kernels on CUDA and the exact torch references elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import (
    paged_decode_attention,
    rms_norm,
    rope_and_store_kv,
    rope_tables,
    silu_and_mul,
    varlen_causal_attention,
)
from ...models.llama import LlamaForCausalLM
from ..attention import LayerKV


@dataclass
class FusedLayer:
    """One decoder layer's weights in the fused layout."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` along the output dim; re-point each module's
    parameters at its slice of the result so the separate copies are freed."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


class FusedLlama:
    """Prefill and decode forwards of a (single-shard) `LlamaForCausalLM` over the engine's paged cache."""

    def __init__(self, model: LlamaForCausalLM, caches: list[LayerKV], max_positions: int) -> None:
        cfg = model.config
        self.model = model
        self.caches = caches
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.norm_eps
        self.scale = cfg.head_dim ** -0.5
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers: list[FusedLayer] = []
        with torch.no_grad():
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
                gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
                self.layers.append(FusedLayer(
                    qkv=qkv, qkv_bias=qkv_bias, o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
                    gate_up=gate_up, gate_up_bias=gate_up_bias, down=mlp.down_proj.weight,
                    down_bias=mlp.down_proj.bias, input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight))
        self.cos, self.sin = rope_tables(model.inv_freq, max_positions)
        # Set by engine/kv_export.py while a prefill stages its KV for export: called with the layer index
        # once the layer stored its KV. Decode steps (and their CUDA graphs) never call it.
        self.after_prefill_layer: Callable[[int], None] | None = None

    @staticmethod
    def supports(model: nn.Module, tp_size: int) -> bool:
        """The fused path covers the Llama family on one shard (TP layers all-reduce inside DeepSpeed's modules)."""
        return isinstance(model, LlamaForCausalLM) and tp_size == 1

    @property
    def graph_safe(self) -> bool:
        """Whether every kernel of a step takes the fused Triton path, so a step can be captured in a CUDA
        graph: RoPE needs a power-of-two half head dim of 16 or more, the paged decode attention whole query
        groups. The torch references it falls back to otherwise index with boolean masks, which wait for
        the device and so cannot be captured."""
        half = self.head_dim // 2
        return half >= 16 and half & (half - 1) == 0 and self.num_heads % self.num_kv_heads == 0

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, hd = qkv.shape[0], self.head_dim
        nq, nkv = self.num_heads * hd, self.num_kv_heads * hd
        return (qkv[:, :nq].view(t, self.num_heads, hd), qkv[:, nq:nq + nkv].view(t, self.num_kv_heads, hd),
                qkv[:, nq + nkv:].view(t, self.num_kv_heads, hd))

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                attend, after_store: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All decoder layers; returns the last MLP output and the residual stream it adds to."""
        h = F.embedding(ids, self.embed)
        residual = None
        for i, (w, cache) in enumerate(zip(self.layers, self.caches, strict=True)):
            x, residual = rms_norm(h, w.input_norm, self.eps, residual)
            q, k, v = self._split(F.linear(x, w.qkv, w.qkv_bias))
            rope_and_store_kv(q, k, v, positions, self.cos, self.sin, cache.keys, cache.values, slots)
            if after_store is not None:
                after_store(i)
            a = attend(i, q, k, v, cache)
            h = F.linear(a.reshape(a.shape[0], -1), w.o, w.o_bias)
            x, residual = rms_norm(h, w.post_norm, self.eps, residual)
            h = F.linear(silu_and_mul(F.linear(x, w.gate_up, w.gate_up_bias)), w.down, w.down_bias)
        return h, residual

    def _logits(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x, _ = rms_norm(h, self.final_norm, self.eps, residual)
        return F.linear(x, self.lm_head).float()

    def prefill_logits(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cu_seqlens: torch.Tensor, max_seqlen: int, rows: torch.Tensor) -> torch.Tensor:
        """Packed prompts (no cached prefix): store their KV, float32 logits of the tokens at `rows`."""

        def attend(_i, q, k, v, _cache):
            return varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, self.scale)

        h, residual = self._layers(ids, positions, slots, attend, self.after_prefill_layer)
        return self._logits(h[rows], residual[rows])

    def decode_logits(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      num_splits: int | None = None) -> torch.Tensor:
        """One token per sequence (a padding row has slot -1 and context 0): float32 logits [B, vocab]."""

        def attend(_i, q, _k, _v, cache):
            return paged_decode_attention(q, cache.keys, cache.values, block_tables, context_lens, self.scale,
                                          num_splits)

        return self._logits(*self._layers(ids, positions, slots, attend))
