"""The kernels the engine calls: Triton on CUDA tensors, the torch reference everywhere else.

Dispatch is per call and depends only on where the tensors live (and that Triton imports), so the
same model code runs exact float32 on CPU and fused bf16 on a GPU.
"""

from __future__ import annotations

import functools

import torch

from . import reference


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and CUDA is usable (the kernels compile for the local GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) * weight over the last dim of a [T, H] tensor; also returns x + residual."""
    if _use_triton(x) and x.dim() == 2 and x.stride(1) == 1 and (residual is None or residual.stride(1) == 1):
        from .triton_elementwise import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return reference.rms_norm_ref(x, weight, eps, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU over a fused [T, 2F] gate|up projection."""
    if _use_triton(gate_up) and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        from .triton_elementwise import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return reference.silu_and_mul_ref(gate_up)


def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Rotate q and k in place (RoPE, half-split layout) and store k, v at `slot_mapping` (-1: skip)."""
    head_dim = q.shape[-1]
    if (_use_triton(q) and _pow2(head_dim // 2) and q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
            and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and cos.stride(1) == 1):
        from .triton_elementwise import rope_and_store_kv_triton

        rope_and_store_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
        return
    reference.rope_and_store_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """Decode attention over a paged cache (see `reference.paged_decode_attention_ref` for shapes).

    `num_splits` fixes how many programs share one sequence's context (None: chosen from the batch
    size); keep it fixed for a captured CUDA graph.
    """
    if _use_triton(q) and _pow2(q.shape[-1]) and q.shape[1] % k_cache.shape[2] == 0:
        from .triton_paged_decode import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    return reference.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, scale: float) -> torch.Tensor:
    """Prefill attention over packed prompts (q [T, Hq, D], k/v [T, Hkv, D], int32 cu_seqlens [n + 1]).

    On CUDA in half precision: prompts of 1k tokens and more go to the Triton flash kernel
    (`triton_prefill.py`; on an H100 1.4x FlashAttention-2 at 2-4k tokens), shorter ones to
    FlashAttention-2's varlen kernel as PyTorch ships it (faster below 1k). Both take the whole packed
    batch in one launch with GQA and no padding. Elsewhere one SDPA per prompt.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        head_dim = q.shape[-1]
        if (max_seqlen >= _TRITON_PREFILL_MIN_TOKENS and _use_triton(q) and _pow2(head_dim) and head_dim <= 128
                and q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1):
            from .triton_prefill import prefill_attention_triton

            return prefill_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale)
        if head_dim <= 256:
            return flash_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    return reference.varlen_causal_attention_ref(q, k, v, cu_seqlens, scale)


# Measured on an H100 (bench/NOTES-gpu.md): FA2 wins at 512 tokens, the Triton kernel from 1024 on.
_TRITON_PREFILL_MIN_TOKENS = 1024


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, scale: float) -> torch.Tensor:
    """FlashAttention-2 varlen forward (causal) through PyTorch's private op; CUDA, half precision."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                   0.0, True, False, scale=scale)[0]
