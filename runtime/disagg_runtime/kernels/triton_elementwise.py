"""Fused element-wise Triton kernels for the Llama layer: residual add + RMSNorm, SwiGLU, RoPE + KV store.

Each replaces a chain of 3-8 torch ops that would each read and write the activations again; in a
decode step (batch 1-128) they also cut the kernel count per layer, which matters even inside a CUDA
graph (every kernel costs a few microseconds however little it does). Rounding mirrors
`reference.py` (float32 inside, the same casts back to the activation dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .pdl import launch_options


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s,
                     n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H]. Returns (RMSNorm(x + residual) * weight, x + residual)."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, summed,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), summed.stride(0),
        cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
        **launch_options(x.device),
    )
    return out, summed


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2F] (gate then up). Returns silu(gate) * up: [T, F]."""
    rows, two_f = gate_up.shape
    n = two_f // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                         BLOCK=block, num_warps=4, **launch_options(gate_up.device))
    return out


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_cos, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                       NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                       KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_cos + d)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d)[None, :]

    hq = tl.arange(0, Q_HEADS_PAD)[:, None]
    qmask = hq < NUM_Q_HEADS
    q1p = q_ptr + t * stride_qt + hq * stride_qh + d[None, :]
    q1 = tl.load(q1p, mask=qmask, other=0.0)
    q2 = tl.load(q1p + HALF, mask=qmask, other=0.0)
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    tl.store(q1p, (q1f * c - q2f * s).to(q1.dtype), mask=qmask)
    tl.store(q1p + HALF, (q2f * c + q1f * s).to(q1.dtype), mask=qmask)

    hk = tl.arange(0, KV_HEADS_PAD)[:, None]
    kmask = hk < NUM_KV_HEADS
    k1p = k_ptr + t * stride_kt + hk * stride_kh + d[None, :]
    k1 = tl.load(k1p, mask=kmask, other=0.0)
    k2 = tl.load(k1p + HALF, mask=kmask, other=0.0)
    k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
    r1 = (k1f * c - k2f * s).to(k1.dtype)
    r2 = (k2f * c + k1f * s).to(k1.dtype)
    tl.store(k1p, r1, mask=kmask)
    tl.store(k1p + HALF, r2, mask=kmask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        kc = kc_ptr + blk * stride_kcb + off * stride_kct + hk * stride_kch + d[None, :]
        tl.store(kc, r1.to(kc_ptr.dtype.element_ty), mask=kmask)
        tl.store(kc + HALF, r2.to(kc_ptr.dtype.element_ty), mask=kmask)
        vp = v_ptr + t * stride_vt + hk * stride_vh + d[None, :]
        vc = vc_ptr + blk * stride_vcb + off * stride_vct + hk * stride_vch + d[None, :]
        tl.store(vc, tl.load(vp, mask=kmask, other=0.0).to(vc_ptr.dtype.element_ty), mask=kmask)
        tl.store(vc + HALF, tl.load(vp + HALF, mask=kmask, other=0.0).to(vc_ptr.dtype.element_ty), mask=kmask)


def rope_and_store_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """Same contract as `reference.rope_and_store_kv_ref`; q/k/v may be strided views of a fused QKV."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if tokens == 0:
        return
    _rope_store_kernel[(tokens,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2, BLOCK_SIZE=k_cache.shape[1], num_warps=4, **launch_options(q.device),
    )
