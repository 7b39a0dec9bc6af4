"""The kernels the engine calls: Triton on CUDA tensors, the torch reference everywhere else.

Dispatch is per call and depends only on where the tensors live (and that Triton imports), so the
same model code runs exact float32 on CPU and fused bf16 on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

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
                            max_seqlen: int, scale: float, seq_lens: Sequence[int] | None = None) -> torch.Tensor:
    """Prefill attention over packed prompts (q [T, Hq, D], k/v [T, Hkv, D], int32 cu_seqlens [n + 1]).

    On CUDA in half precision: a few long prompts (the host-side `seq_lens` say so) go one by one
    through cuDNN's fused attention, which runs causal bf16 attention on Hopper about twice as fast as
    FlashAttention-2; otherwise the whole batch is one launch of FlashAttention-2's varlen kernel as
    PyTorch ships it (GQA without repeating K/V, no padding). Elsewhere one SDPA per prompt.
    """
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256):
        return reference.varlen_causal_attention_ref(q, k, v, cu_seqlens, scale)
    if (seq_lens is not None and len(seq_lens) <= _CUDNN_MAX_PROMPTS and min(seq_lens) >= _CUDNN_MIN_TOKENS
            and cudnn_attention_usable(q.device)):
        out = torch.empty_like(q)
        start = 0
        for n in seq_lens:
            end = start + n
            out[start:end] = _cudnn_causal(q[start:end], k[start:end], v[start:end], scale)
            start = end
        return out
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                   0.0, True, False, scale=scale)[0]


# cuDNN wins on long prompts; many short ones are better served by one varlen launch.
_CUDNN_MIN_TOKENS = 256
_CUDNN_MAX_PROMPTS = 16


def _cudnn_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    if group > 1:  # K/V are a few % of the bytes of a long prefill: repeat them rather than rely on GQA support
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


@functools.cache
def cudnn_attention_usable(device: torch.device) -> bool:
    """Whether PyTorch's cuDNN attention runs here (it needs a recent cuDNN and GPU); probed once."""
    try:
        x = torch.randn(64, 2, 64, device=device, dtype=torch.bfloat16)
        _cudnn_causal(x, x[:, :1], x[:, :1], 0.125)
    except RuntimeError:
        return False
    return True
