"""Kernels: the torch references against independent formulations (CPU), the Triton kernels against the
references in float64 (GPU only), and the paged decode kernel inside a replayed CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disagg_runtime.kernels import reference as ref

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _paged_case(gen: torch.Generator, context_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
                block_size: int, dtype: torch.dtype, device: str = "cpu"):
    """Random contiguous K/V per sequence, scattered into randomly chosen blocks of a paged cache."""
    max_blocks = max(1, max(-(-c // block_size) for c in context_lens))
    total = len(context_lens) * max_blocks + 3
    k_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen)
    block_tables = perm[: len(context_lens) * max_blocks].view(len(context_lens), max_blocks).to(torch.int32)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, block_tables, ctx)]


def _dense_attention(q, k_cache, v_cache, block_tables, ctx, scale):
    """Independent check: gather each sequence's K/V, then SDPA with repeated kv heads, in float64."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    outs = []
    for b, n in enumerate(ctx.tolist()):
        if n == 0:
            outs.append(torch.zeros_like(q[b], dtype=torch.float64))
            continue
        slots = [int(block_tables[b, t // block_size]) * block_size + t % block_size for t in range(n)]
        keys = k_cache.reshape(-1, num_kv_heads, k_cache.shape[-1])[slots].double()
        vals = v_cache.reshape(-1, num_kv_heads, v_cache.shape[-1])[slots].double()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)
        vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b].double()[:, None, :], keys, vals, scale=scale)
        outs.append(o[:, 0, :])
    return torch.stack(outs)


@pytest.mark.parametrize("context_lens,group,block_size", [([1, 17, 64, 100], 4, 16), ([33, 5], 1, 8),
                                                            ([0, 40, 7], 8, 16)])
def test_reference_paged_decode_matches_dense_attention(context_lens, group, block_size):
    gen = torch.Generator().manual_seed(len(context_lens) * 31 + group)
    q, kc, vc, bt, ctx = _paged_case(gen, context_lens, 2, group, 32, block_size, torch.float64)
    out = ref.paged_decode_attention_ref(q, kc, vc, bt, ctx, 0.2, compute_dtype=torch.float64)
    want = _dense_attention(q, kc, vc, bt, ctx, 0.2)
    assert _rel(out, want) < 1e-12
    for b, n in enumerate(context_lens):
        if n == 0:
            assert torch.count_nonzero(out[b]) == 0


def test_reference_rms_norm_matches_hf_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(1)
    x, r = torch.randn(2, 7, 48, generator=gen).unbind(0)
    norm = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
        want = norm(x + r)
    out, summed = ref.rms_norm_ref(x, norm.weight.detach(), 1e-6, residual=r)
    assert torch.equal(summed, x + r)
    assert torch.equal(out, want)
    alone, same = ref.rms_norm_ref(x, norm.weight.detach(), 1e-6)
    assert same is x and torch.equal(alone, norm(x).detach())


def test_reference_rope_matches_hf_and_stores_only_real_slots():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(2)
    tokens, hq, hkv, d, block = 6, 4, 2, 16, 4
    q = torch.randn(tokens, hq, d, generator=gen)
    k = torch.randn(tokens, hkv, d, generator=gen)
    v = torch.randn(tokens, hkv, d, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = ref.rope_tables(inv_freq, 32)
    positions = torch.tensor([0, 1, 2, 9, 31, 4])
    slots = torch.tensor([0, 5, 6, -1, 11, 2])
    emb = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((emb, emb), dim=-1)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None],
                                          emb.sin()[None])
    sentinel = 7.0
    kc = torch.full((3, block, hkv, d), sentinel)
    vc = torch.full((3, block, hkv, d), sentinel)
    q2, k2 = q.clone(), k.clone()
    ref.rope_and_store_kv_ref(q2, k2, v, positions, cos, sin, kc, vc, slots)
    assert _rel(q2, want_q[0].transpose(0, 1)) < 1e-6
    assert _rel(k2, want_k[0].transpose(0, 1)) < 1e-6
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k2[t]) and torch.equal(flat_v[s], v[t])
    untouched = sorted(set(range(flat_k.shape[0])) - {s for s in slots.tolist() if s >= 0})
    assert bool((flat_k[untouched] == sentinel).all()) and bool((flat_v[untouched] == sentinel).all())


def test_reference_silu_and_mul_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(3)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu"))
    x = torch.randn(5, 32)
    fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    with torch.no_grad():
        out = mlp.down_proj(ref.silu_and_mul_ref(x @ fused.T))
        assert _rel(out, mlp(x)) < 1e-6


def _masked_attention(q, k, v, lens, scale):
    """Independent check: one dense attention over the whole packed batch with a block-diagonal causal mask."""
    total = q.shape[0]
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    idx = torch.arange(total)
    allowed = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), kk.double()) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hts,shd->thd", probs, vv.double())


def test_reference_varlen_attention_matches_block_diagonal_mask():
    gen = torch.Generator().manual_seed(4)
    lens = [5, 1, 12]
    q = torch.randn(sum(lens), 6, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens), 2, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens), 2, 16, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    out = ref.varlen_causal_attention_ref(q, k, v, cu, 0.3)
    assert _rel(out, _masked_attention(q, k, v, lens, 0.3)) < 1e-12


# ---------------------------------------------------------------- GPU: Triton against the references


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("context_lens,group,head_dim,block_size,num_splits", [
    ([1], 4, 128, 16, None),
    ([512] * 8, 4, 128, 16, None),
    ([1, 15, 16, 17, 300, 1024, 0, 77], 4, 128, 16, None),
    ([1, 15, 16, 17, 300, 1024, 0, 77], 4, 128, 16, 1),
    ([2000, 3, 129], 8, 64, 32, 7),
    ([65, 64, 63], 1, 128, 16, 3),
    ([4096, 1], 7, 128, 16, 16),
])
def test_triton_paged_decode_matches_float64(context_lens, group, head_dim, block_size, num_splits):
    from disagg_runtime.kernels.triton_paged_decode import paged_decode_attention_triton

    for seed in range(2):
        gen = torch.Generator().manual_seed(seed * 1000 + sum(context_lens))
        q, kc, vc, bt, ctx = _paged_case(gen, context_lens, 2, group, head_dim, block_size, torch.bfloat16,
                                         "cuda")
        scale = head_dim ** -0.5
        out = paged_decode_attention_triton(q, kc, vc, bt, ctx, scale, num_splits)
        want = ref.paged_decode_attention_ref(q.double(), kc.double(), vc.double(), bt, ctx, scale,
                                              compute_dtype=torch.float64)
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        assert _rel(out, want) < 1e-2
        for b, n in enumerate(context_lens):
            if n == 0:
                assert torch.count_nonzero(out[b]) == 0
            else:
                assert _rel(out[b], want[b]) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_triton_paged_decode_replays_in_cuda_graph_with_new_inputs():
    from disagg_runtime.kernels import paged_decode_attention

    gen = torch.Generator().manual_seed(5)
    q, kc, vc, bt, ctx = _paged_case(gen, [100, 7, 260, 1], 2, 4, 128, 16, torch.bfloat16, "cuda")
    paged_decode_attention(q, kc, vc, bt, ctx, 0.1, num_splits=4)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kc, vc, bt, ctx, 0.1, num_splits=4)
    for lens in ([3, 250, 17, 64], [0, 1, 260, 99]):
        q.copy_(torch.randn(q.shape, generator=gen).to(q))
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        bt.copy_(bt[torch.randperm(bt.shape[0], generator=gen)])
        graph.replay()
        want = ref.paged_decode_attention_ref(q.double(), kc.double(), vc.double(), bt, ctx, 0.1,
                                              compute_dtype=torch.float64)
        assert _rel(out, want) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows,cols,residual", [(1, 4096, True), (37, 4096, False), (5, 1000, True)])
def test_triton_rms_norm_matches_reference(rows, cols, residual):
    from disagg_runtime.kernels.triton_elementwise import rms_norm_triton

    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x) if residual else None
    w = 1 + 0.1 * torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    out, summed = rms_norm_triton(x, w, 1e-5, r)
    want, want_sum = ref.rms_norm_ref(x, w, 1e-5, r)
    assert torch.equal(summed, want_sum)
    s = want_sum.double()
    exact = w.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _rel(out, exact) < 1e-2 and _rel(out, want) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_kernels_launched_with_pdl_give_the_same_bits_in_a_replayed_graph(monkeypatch):
    """A chain of dependent kernels (each reads what the one before wrote) captured with and without
    programmatic dependent launch: the waits keep the order, so the outputs are bit-identical."""
    from disagg_runtime.kernels.pdl import pdl_enabled
    from disagg_runtime.kernels.triton_elementwise import rms_norm_triton, silu_and_mul_triton
    from disagg_runtime.kernels.triton_paged_decode import paged_decode_attention_triton

    gen = torch.Generator().manual_seed(11)
    q, kc, vc, bt, ctx = _paged_case(gen, [300, 17, 64, 1], 2, 4, 128, 16, torch.bfloat16, "cuda")
    w = 1 + 0.1 * torch.randn(8 * 128, device="cuda", dtype=torch.bfloat16)
    fresh = torch.randn(q.shape, generator=gen).to(q)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("DISAGG_PDL", flag)
        x = q.clone()

        def chain(x=x):
            y = x
            for _ in range(8):
                a = paged_decode_attention_triton(y, kc, vc, bt, ctx, 0.1, num_splits=4)
                n, _ = rms_norm_triton(a.reshape(a.shape[0], -1), w, 1e-5)
                y = silu_and_mul_triton(torch.cat([n, n], -1)).view_as(y)
            return y

        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        outs[flag] = (out.clone(), chain().clone())
    assert torch.equal(outs["0"][0], outs["1"][0]) and torch.equal(outs["0"][0], outs["0"][1])
    monkeypatch.setenv("DISAGG_PDL", "0")
    assert not pdl_enabled(torch.device("cuda")) and not pdl_enabled(torch.device("cpu"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows,ffn", [(1, 14336), (300, 1000)])
def test_triton_silu_and_mul_matches_reference(rows, ffn):
    from disagg_runtime.kernels.triton_elementwise import silu_and_mul_triton

    x = torch.randn(rows, 2 * ffn, device="cuda", dtype=torch.bfloat16)
    g, u = x.double().chunk(2, dim=-1)
    assert _rel(silu_and_mul_triton(x), F.silu(g) * u) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_triton_rope_and_store_matches_reference_on_fused_qkv_views():
    from disagg_runtime.kernels.triton_elementwise import rope_and_store_kv_triton

    tokens, hq, hkv, d, block = 9, 32, 8, 128, 16
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d))
    cos, sin = ref.rope_tables(inv_freq, 4096)
    positions = torch.tensor([0, 1, 2, 3, 4000, 17, 18, 19, 20], device="cuda")
    slots = torch.tensor([0, 1, 2, 3, 63, -1, 40, 41, 42], device="cuda")

    def views(t):
        return (t[:, : hq * d].view(tokens, hq, d), t[:, hq * d: (hq + hkv) * d].view(tokens, hkv, d),
                t[:, (hq + hkv) * d:].view(tokens, hkv, d))

    caches = [torch.full((4, block, hkv, d), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    a, b = qkv.clone(), qkv.clone()
    rope_and_store_kv_triton(*views(a), positions, cos, sin, caches[0], caches[1], slots)
    ref.rope_and_store_kv_ref(*views(b), positions, cos, sin, caches[2], caches[3], slots)
    assert _rel(a, b) < 1e-2
    assert _rel(caches[0], caches[2]) < 1e-2 and torch.equal(caches[1], caches[3])
    assert bool((caches[0].view(-1, hkv, d)[4:40] == 7.0).all())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["triton", "flash"])
@pytest.mark.parametrize("heads", [(32, 8, 128), (6, 6, 64)])
@pytest.mark.parametrize("lens", [[1], [300], [17, 1, 128, 513], [1024, 257], [64, 128, 129, 63]])
def test_cuda_varlen_attention_matches_float64_on_fused_qkv_views(lens, heads, kernel):
    from disagg_runtime.kernels.ops import flash_varlen_attention
    from disagg_runtime.kernels.triton_prefill import prefill_attention_triton

    attention = prefill_attention_triton if kernel == "triton" else flash_varlen_attention

    hq, hkv, d = heads
    total = sum(lens)
    qkv = torch.randn(total, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(total, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(total, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(total, hkv, d)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = attention(q, k, v, cu, max(lens), d ** -0.5)
    want = ref.varlen_causal_attention_ref(q.double(), k.double(), v.double(), cu, d ** -0.5)
    assert out.shape == (total, hq, d) and _rel(out, want) < 1e-2
