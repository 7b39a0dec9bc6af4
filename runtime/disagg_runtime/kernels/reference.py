"""Plain-torch versions of every kernel in this package.

They define what the Triton kernels must compute (the tests compare against them in float64) and
they are the path on CPU and wherever Triton is missing. Rounding follows HF transformers' Llama
modules (float32 inside, one cast back to the activation dtype), so a CPU float32 engine stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual` (or of `x`); returns (normed, the sum that becomes the next residual)."""
    summed = x if residual is None else x + residual
    h = summed.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), summed


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a fused [..., 2F] gate|up projection: silu(gate) * up, shape [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim / 2] in float32 from the model's inverse frequencies."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(pos, inv_freq.to(torch.float32))
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos/sin: [T, D/2]. The half-split ("neox") layout that HF Llama uses.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(torch.float32), x[..., half:].to(torch.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_and_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place, then write k and v into the paged cache.

    The caches are [num_blocks, block_size, Hkv, D]; token t goes to flat slot `slot_mapping[t]`
    (block * block_size + offset). A negative slot marks a padding token: nothing is stored for it.
    """
    c, s = cos[positions], sin[positions]
    q.copy_(_rotate(q, c, s))
    k.copy_(_rotate(k, c, s))
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One query token per sequence attending over its paged KV.

    q: [B, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] (int);
    context_lens: [B]. Query heads are grouped onto kv heads (GQA: Hq / Hkv queries per kv head).
    A sequence with context 0 (a padding row) gets zeros.
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    for b, ctx in enumerate(context_lens.tolist()):
        if ctx == 0:
            continue
        nblocks = -(-ctx // block_size)
        blocks = block_tables[b, :nblocks].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].to(compute_dtype)
        vals = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].to(compute_dtype)
        qb = q[b].to(compute_dtype).view(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,thd->hgt", qb, keys) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hgt,thd->hgd", probs, vals).reshape(num_q_heads, head_dim).to(q.dtype)
    return out


def varlen_causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Causal self-attention of packed prompts: q [T, Hq, D], k/v [T, Hkv, D], prompt i is rows
    cu_seqlens[i]:cu_seqlens[i+1]. One SDPA per prompt, so no FLOPs go to padding."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if group > 1:
            ks, vs = ks.repeat_interleave(group, dim=0), vs.repeat_interleave(group, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out
