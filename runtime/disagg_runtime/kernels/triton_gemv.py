"""Small-batch decode projections as Triton GEMVs that fuse the layer's element-wise work around them.

At batch 1-16 a decode step streams every weight once and computes almost nothing, so each kernel between
two weight streams (RMSNorm, SwiGLU, cuBLAS's split-K reduction) and each launch costs time the weights do
not need. Here every projection of a layer is one kernel:

- qkv: RMSNorm of the residual stream in the prologue (its per-row sum of squares was accumulated by the
  kernel that wrote the stream, so no program needs the whole row);
- o and down: the residual add in the epilogue, which writes the new stream and adds its per-row sum of
  squares into a float32 accumulator (atomically: each program owns a slice of the row);
- gate|up: RMSNorm in the prologue, SwiGLU in the epilogue (each program reads the gate rows and the up
  rows of its slice), so the [B, 2F] intermediate is never written.

Programmatic dependent launch (Hopper and later): a kernel launched with `launch_pdl=True` may start while
the kernel before it drains; it reads the first tile of its weights (never written by a step) before
`gdc_wait`, and everything else, reads and writes, after it, so ordering against the previous kernels is
as without PDL. Each kernel lets the next one launch as soon as all its programs started.

Rounding mirrors `reference.py`: the stream and the normalised activations are rounded to the activation
dtype where the unfused ops round them; only the order of the float32 sum of squares differs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Rows one kernel call handles: the MMA tile's M. Batches above it take cuBLAS (the GEMMs there are no
# longer weight streams only).
MAX_ROWS = 16


@dataclass(frozen=True)
class GemvConfig:
    """Tile of one projection: output features and input features per step, warps, pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _normed(x, rstd, nw):
    # As reference.rms_norm_ref rounds: normalise in float32, round, scale by the weight, round.
    return ((x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * nw[None, :].to(tl.float32)).to(x.dtype)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, res_ptr, ss_in_ptr, norm_ptr, ss_out_ptr,
                 M, N, K, up_offset, stride_x, stride_w, stride_y, stride_r, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                 SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                 NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    w_tile = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    up_tile = w_tile + up_offset * stride_w
    # Weights are never written during a step: safe to read before the previous kernel has finished.
    w0 = tl.load(w_tile, mask=col_ok[:, None] & (ks[None, :] < K), other=0.0)
    if SWIGLU:
        u0 = tl.load(up_tile, mask=col_ok[:, None] & (ks[None, :] < K), other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if NORM:
        rstd = tl.rsqrt(tl.load(ss_in_ptr + rows, mask=row_ok, other=0.0) / K + eps)
    x_tile = x_ptr + rows[:, None] * stride_x + ks[None, :]
    x = tl.load(x_tile, mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
    if NORM:
        x = _normed(x, rstd, tl.load(norm_ptr + ks, mask=ks < K, other=0.0))
    acc = tl.dot(x, tl.trans(w0))
    if SWIGLU:
        acc_up = tl.dot(x, tl.trans(u0))
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(x_tile + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            x = _normed(x, rstd, tl.load(norm_ptr + k, mask=k_ok, other=0.0))
        w = tl.load(w_tile + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if SWIGLU:
            u = tl.load(up_tile + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc_up = tl.dot(x, tl.trans(u), acc_up)

    out_dtype = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(bias_ptr + up_offset + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if SWIGLU:
        # As reference.silu_and_mul_ref: the projections and the activation each rounded.
        g = acc.to(out_dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_dtype).to(tl.float32)
        out = (act * acc_up.to(out_dtype).to(tl.float32)).to(out_dtype)
    elif RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
        out = (acc.to(out_dtype).to(tl.float32) + r.to(tl.float32)).to(out_dtype)
        sq = out.to(tl.float32)
        tl.atomic_add(ss_out_ptr + rows, tl.sum(tl.where(ok, sq * sq, 0.0), 1), mask=row_ok)
    else:
        out = acc.to(out_dtype)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], out, mask=ok)


@triton.jit
def _sum_squares_kernel(x_ptr, ss_ptr, stride_x, K, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(ss_ptr + row, tl.sum(acc, 0))


@functools.cache
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 (Hopper) or later."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _config(n: int, k: int) -> GemvConfig:
    # Enough programs to cover the SMs at least once with ~128 KB of weights each; measured in
    # bench/kernel_variants.py --parts gemv (bench/NOTES-gpu.md).
    return GemvConfig(block_n=16 if n <= 8192 else 32, block_k=256)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, swiglu: bool = False,
         residual: tuple[torch.Tensor, torch.Tensor] | None = None, config: GemvConfig | None = None,
         pdl: bool | None = None) -> torch.Tensor:
    """x [M <= 16, K] times w [N, K]^T, with the fusions of the module doc.

    norm: (sum of squares [M] float32 of x's rows, RMSNorm weight [K], eps): x is normalised on the fly.
    swiglu: w is a fused gate|up [2F, K]; returns silu(x·gate^T) * (x·up^T) [M, F].
    residual: (the stream [M, N] to add, float32 [M] accumulator the new stream's sum of squares is added to);
    returns the new stream.
    """
    rows, k = x.shape
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}")
    if swiglu and residual is not None:
        raise ValueError("gemv fuses SwiGLU or a residual add, not both")
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    cfg = config or _config(n, k)
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    ss_in, norm_w, eps = norm if norm is not None else (x, x, 0.0)
    res, ss_out = residual if residual is not None else (x, x)
    use_pdl = pdl_supported(x.device.index or 0) if pdl is None else pdl
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, bias if bias is not None else w, y, res, ss_in, norm_w, ss_out,
        rows, n, k, n if swiglu else 0, x.stride(0), w.stride(0), y.stride(0), res.stride(0), eps,
        BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM=norm is not None, SWIGLU=swiglu,
        RESIDUAL=residual is not None, HAS_BIAS=bias is not None, PDL=use_pdl, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, **({"launch_pdl": True} if use_pdl else {}),
    )
    return y


def sum_squares(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-row float32 sum of squares of x [M, K] into out [M] (the first layer's norm input)."""
    rows, k = x.shape
    _sum_squares_kernel[(rows,)](x, out, x.stride(0), k, BLOCK=1024, num_warps=4)
    return out
