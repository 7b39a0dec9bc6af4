"""Chunked prefill: mixed steps (decode tokens + prompt chunks) give the same greedy tokens as whole prompts."""

from __future__ import annotations

import pytest
import torch
from disagg_runtime.engine import Engine, GenerationRequest, InvalidRequest, KVCacheFull, SamplingParams
from disagg_runtime.engine.chunked import PrefillChunk

VARIANTS = ("llama", "opt", "qwen2")


def _prompts(seed: int, lengths) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=gen).tolist() for n in lengths]


def _req(rid: str, prompt: list[int], max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _chunked_run(engine: Engine, early: dict[str, list[int]], late: dict[str, list[int]], chunk: int,
                 join_after: int = 3) -> dict[str, list[int]]:
    """`early` prompts prefill whole and decode; after `join_after` steps `late` prompts join in `chunk`-token
    chunks (at most two prompts' chunks per step), mixed with the running decodes."""
    out: dict[str, list[int]] = {rid: [] for rid in [*early, *late]}
    for o in engine.prefill([_req(rid, p) for rid, p in early.items()]):
        out[o.request_id].append(o.token_id)
    left = {rid: len(p) for rid, p in late.items()}
    for rid, p in late.items():
        engine.admit_chunked(_req(rid, p))
    steps = 0
    while any(rid in engine.request_ids for rid in out):
        chunks = []
        if steps >= join_after:
            for rid in [r for r, n in left.items() if n > 0][:2]:
                take = min(chunk, left[rid])
                chunks.append(PrefillChunk(rid, take))
                left[rid] -= take
        for o in engine.mixed_step(chunks):
            out[o.request_id].append(o.token_id)
        steps += 1
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_mixed_batches_give_the_unchunked_greedy_tokens(model_dirs, variant, chunk):
    early = dict(zip(("a", "b"), _prompts(1, (9, 23)), strict=True))
    late = dict(zip(("c", "d", "e"), _prompts(2, (40, 17, 5)), strict=True))
    reference = Engine.load(model_dirs[variant], num_blocks=256, block_size=8)
    want = reference.generate([_req(rid, p) for rid, p in {**early, **late}.items()])
    engine = Engine.load(model_dirs[variant], num_blocks=256, block_size=8)
    got = _chunked_run(engine, early, late, chunk)
    assert got == want
    assert engine.free_blocks == engine.total_blocks  # every request released its blocks


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_mixed_steps_preempt_on_demand_and_still_give_the_unchunked_tokens(llama_dir, preemption):
    early = dict(zip(("a", "b"), _prompts(1, (9, 23)), strict=True))
    late = dict(zip(("c", "d", "e"), _prompts(2, (40, 17, 5)), strict=True))
    want = Engine.load(llama_dir, num_blocks=256, block_size=8).generate(
        [_req(rid, p) for rid, p in {**early, **late}.items()])
    # 16 blocks hold every prompt (14 blocks) but not every whole life (21): decode growth must preempt.
    engine = Engine.load(llama_dir, num_blocks=16, block_size=8, preemption=preemption)
    got = _chunked_run(engine, early, late, 7)
    assert engine.preemption_stats.preemptions > 0
    assert got == want
    assert engine.free_blocks == engine.total_blocks


def test_a_chunked_prompt_ends_with_the_kv_of_a_whole_prefill(llama_dir):
    [prompt] = _prompts(3, (37,))
    whole = Engine.load(llama_dir, num_blocks=64, block_size=8)
    whole.prefill([_req("r", prompt)])
    chunked = Engine.load(llama_dir, num_blocks=64, block_size=8)
    chunked.admit_chunked(_req("r", prompt))
    for n in (10, 10, 10):
        assert chunked.mixed_step([PrefillChunk("r", n)]) == []  # no token before the last chunk
    [first] = chunked.mixed_step([PrefillChunk("r", 7)])
    a, b = whole.export_kv("r"), chunked.export_kv("r")
    for ka, kb in zip(a.keys, b.keys, strict=True):
        torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-5)
    assert first.token_id == whole._seqs["r"].output_ids[0]


def test_plain_decode_skips_prompts_still_being_chunked(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=64, block_size=8)
    engine.prefill([_req("a", _prompts(4, (6,))[0])])
    engine.admit_chunked(_req("b", _prompts(5, (20,))[0]))
    engine.mixed_step([PrefillChunk("b", 8)])
    outs = engine.decode()
    assert [o.request_id for o in outs] == ["a"]
    assert engine.abort("b") and "b" not in engine.request_ids


def test_bad_chunks_and_full_memory_are_refused(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=8, block_size=8)
    engine.admit_chunked(_req("a", list(range(4, 20)), max_tokens=8))
    with pytest.raises(InvalidRequest, match="17 tokens"):
        engine.mixed_step([PrefillChunk("a", 17)])
    with pytest.raises(KVCacheFull):
        engine.admit_chunked(_req("b", list(range(4, 52)), max_tokens=8))  # 6 prompt blocks + watermark
    engine.mixed_step([PrefillChunk("a", 16)])
    with pytest.raises(InvalidRequest, match="no prompt left"):
        engine.mixed_step([PrefillChunk("a", 1)])


@pytest.mark.gpu
def test_mixed_steps_match_whole_prefill_on_gpu(llama_dir):
    early = dict(zip(("a", "b"), _prompts(1, (9, 23)), strict=True))
    late = dict(zip(("c", "d"), _prompts(2, (40, 17)), strict=True))
    # float32 takes the reference kernels, whose masked stores cannot be captured: decode eagerly (mixed steps
    # never use the graphs anyway).
    kwargs = dict(device="cuda", dtype=torch.float32, num_blocks=256, block_size=16, cuda_graphs=False)
    want = Engine.load(llama_dir, **kwargs).generate([_req(rid, p) for rid, p in {**early, **late}.items()])
    got = _chunked_run(Engine.load(llama_dir, **kwargs), early, late, 16)
    assert got == want
