"""Paged decode attention in Triton: one query token per sequence over a block-table KV cache.

One program owns one (sequence, kv head, context split). It loads all the query heads that share
that kv head (GQA) as one tile, so every K/V byte is read from HBM exactly once per step, and walks
its share of the context in tiles of BLOCK_N tokens through the block table. Decode is bound by
memory, so the only goal is to keep enough bytes in flight: with few sequences (batch 1-8, 8 kv
heads) there are too few programs to fill 132 SMs, so the context is split and a second small
kernel merges the partial softmaxes (flash-decoding). The split count depends only on the batch
size, never on the context, so the grid is fixed and the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .pdl import launch_options

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # Each split takes a whole number of tiles so that only the last tile of the context is ragged.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tmask = tok < end
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = tok % BLOCK_SIZE
        k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=tmask[:, None], other=0.0)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty split (or a padding row with context 0) leaves l_i == 0: write zeros, not 0/0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    if NUM_SPLITS > 1:
        tl.store(m_ptr + b * stride_mb + heads * stride_mh + split, m_i, mask=gmask)
        tl.store(l_ptr + b * stride_mb + heads * stride_mh + split, l_i, mask=gmask)


@triton.jit
def _decode_merge_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_mb, stride_mh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    smask = s < NUM_SPLITS
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + s, mask=smask, other=float("-inf"))
    lse = tl.load(l_ptr + b * stride_mb + h * stride_mh + s, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(lse > 0, lse * tl.exp2(m - m_max), 0.0)
    w_sum = tl.sum(w, 0)
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=smask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence so that batch * kv heads * splits covers the SMs about twice."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * num_kv_heads
    return max(1, min(16, -(-2 * sms // programs)))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  num_splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                                  num_stages: int | None = None) -> torch.Tensor:
    """Triton launch; shapes as in `reference.paged_decode_attention_ref`. Returns [B, Hq, D] in q's dtype.

    `num_stages` defaults to 4 from 64 sequences on (one split per sequence: deeper pipelining keeps more K/V
    bytes in flight per program) and 2 below. On an H200, 32 layers' calls in one CUDA graph at context 512
    (bench/kernel_variants.py): batch 128 went from 78.3 to 68.5 us a layer (94% of the copy bandwidth), the
    whole 8B decode step from 8.16 to 8.05-8.09 ms. At batch 32 the best tile alone (128 tokens, 8 warps,
    4 stages: 24.0 -> 21.5 us) made the whole step slower (5.49 -> 5.68-5.76 ms), so the small tile stays."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_stages is None:
        num_stages = 4 if batch >= 64 else 2
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, q.device)
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("paged decode attention needs the head dim contiguous in q and both caches")
    out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_splits == 1:
        part, m, lsum = out, out, out  # m/lsum are unused when NUM_SPLITS == 1
        stride_os, stride_mb, stride_mh = 0, 0, 0
    else:
        part = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        m = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        stride_os, stride_mb, stride_mh = part.stride(2), m.stride(0), m.stride(1)
    stride_ob, stride_oh = (out.stride(0), out.stride(1)) if num_splits == 1 else (part.stride(0), part.stride(1))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, m, lsum,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        stride_ob, stride_oh, stride_os,
        stride_mb, stride_mh,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        num_warps=num_warps, num_stages=num_stages, **launch_options(q.device),
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_q_heads)](
            part, m, lsum, out,
            part.stride(0), part.stride(1), part.stride(2),
            m.stride(0), m.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4, **launch_options(q.device),
        )
    return out
