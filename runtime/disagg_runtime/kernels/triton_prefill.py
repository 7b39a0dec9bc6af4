"""Causal flash attention for packed prompts in Triton (forward only, GQA, varlen).

One program owns BLOCK_M queries of one head of one prompt and streams that prompt's keys and
values in tiles of BLOCK_N with an online softmax (exp2, float32 accumulators), so the T x T scores
never reach HBM. Keys wholly before the query tile need no mask; only the tiles on the diagonal are
masked, in a second loop, so the common case carries no per-element compare. Programs are issued
heaviest first (the last query tile of a causal prompt sees the most keys) to shorten the tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_ptrs, v_ptrs, n0, offs_m, offs_n, seqlen, qk_scale, stride_kt, stride_vt,
                 DIAGONAL: tl.constexpr):
    kn = n0 + offs_n
    if DIAGONAL:
        k = tl.load(k_ptrs + n0 * stride_kt, mask=(kn < seqlen)[:, None], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=(kn < seqlen)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + n0 * stride_kt)
        v = tl.load(v_ptrs + n0 * stride_vt)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if DIAGONAL:
        s = tl.where(offs_m[:, None] >= kn[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    seqlen = tl.load(cu_ptr + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 < seqlen:
        kvh = head // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row = start.to(tl.int64)
        q = tl.load(q_ptr + (row + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=(offs_m < seqlen)[:, None], other=0.0)
        k_ptrs = k_ptr + (row + offs_n)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        v_ptrs = v_ptr + (row + offs_n)[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(0, m0, BLOCK_N):  # keys before the tile: all visible, all inside the prompt
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptrs, v_ptrs, n0, offs_m, offs_n, seqlen, qk_scale,
                                         stride_kt, stride_vt, DIAGONAL=False)
        for n0 in range(m0, tl.minimum(m0 + BLOCK_M, seqlen), BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptrs, v_ptrs, n0, offs_m, offs_n, seqlen, qk_scale,
                                         stride_kt, stride_vt, DIAGONAL=True)
        out = acc / l_i[:, None]
        tl.store(o_ptr + (row + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=(offs_m < seqlen)[:, None])


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_seqlen: int, scale: float, block_m: int = 64, block_n: int = 64,
                             num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (head dim contiguous), int32 cu_seqlens [n + 1] -> [T, Hq, D].

    The default tile (64 x 64, 4 warps, 3 stages) was the fastest of five tried on an H100 at
    1-4k tokens, head dim 128 (bench/NOTES-gpu.md).
    """
    tokens, num_heads, head_dim = q.shape
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("prefill attention needs the head dim contiguous in q, k and v")
    out = torch.empty(tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(max_seqlen, block_m), num_heads, cu_seqlens.numel() - 1)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
