"""KV on demand: admission by prompt + watermark, preemption (swap and recompute) that never changes tokens."""

from __future__ import annotations

import pytest
import torch
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.engine.preemption import HostSwapSpace, preempt, resume
from disagg_runtime.engine.testing import run_fcfs


def _req(rid: str, n: int, max_tokens: int, *, seed: int = 0, temperature: float = 0.0,
         sample_seed: int | None = None) -> GenerationRequest:
    ids = torch.randint(4, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=sample_seed, ignore_eos=True)
    return GenerationRequest(rid, ids, params)


def _solo(model_dir, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    return {r.request_id: Engine.load(model_dir, num_blocks=64).generate([r])[r.request_id] for r in requests}


def test_a_request_whose_max_tokens_is_the_whole_context_does_not_block_others(llama_dir):
    # 32 blocks of 16 = the model's 512-token context: a whole-life reservation of "big" would take every block.
    engine = Engine.load(llama_dir, num_blocks=32, block_size=16)
    big = _req("big", 8, 512 - 8, seed=1)
    small = [_req(f"s{i}", 20, 10, seed=2 + i) for i in range(3)]
    engine.check_admissible(8, 504)
    got = {o.request_id: [o.token_id] for o in engine.prefill([big])}
    assert engine.can_admit(20)
    got.update({o.request_id: [o.token_id] for o in engine.prefill(small)})
    big_when_small_done = None
    while engine.num_running:
        for o in engine.decode():
            got[o.request_id].append(o.token_id)
        if big_when_small_done is None and all(len(got[r.request_id]) == 10 for r in small):
            big_when_small_done = len(got["big"])
    assert big_when_small_done == 10  # the small ones decoded next to big, not after it
    assert got == _solo(llama_dir, [big, *small])


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_preemption_never_changes_the_tokens(llama_dir, mode, sampling):
    temperature, seed = (0.0, None) if sampling == "greedy" else (0.9, 7)
    requests = [_req(f"r{i}", 12 + 3 * i, 60, seed=10 + i, temperature=temperature,
                     sample_seed=None if seed is None else seed + i) for i in range(6)]
    engine = Engine.load(llama_dir, num_blocks=12, block_size=8, preemption=mode)  # 96 tokens for 6 x ~75
    got = run_fcfs(engine, requests)
    stats = engine.preemption_stats
    assert stats.preemptions > 0
    assert (stats.swapped_tokens > 0) == (mode == "swap") and (stats.recomputed_tokens > 0) == (mode == "recompute")
    assert got == _solo(llama_dir, requests)
    assert engine.free_blocks == engine.total_blocks and engine.swap_space.used_bytes == 0


def test_preempted_requests_resume_before_new_ones_are_admitted(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=8, block_size=4)
    engine.prefill([_req("old", 8, 20, seed=1), _req("new", 8, 20, seed=2)])  # 2 + 2 blocks of 8
    for _ in range(9):  # the 9th step writes position 16 of both: a 5th block each, one is free
        engine.decode()
    assert engine.num_preempted == 1 and engine._seqs["new"].preempted  # the latest admitted went first
    assert not engine.can_admit(1)  # "new" resumes first, however small the newcomer
    while engine.num_preempted:
        engine.decode()
    assert engine.num_running == 1 and "old" not in engine._seqs


def test_swap_round_trip_is_bit_exact(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=16, block_size=4, dtype=torch.bfloat16)
    engine.prefill([_req("a", 10, 20, seed=3)])
    for _ in range(5):
        engine.decode()
    seq = engine._seqs["a"]
    before = engine.cache.read(seq.block_table, seq.num_cached)
    preempt(engine, seq)
    assert seq.preempted and seq.block_table == [] and engine.free_blocks == 16
    filler = engine.allocator.allocate(4)  # the old blocks get reused and overwritten meanwhile
    engine.cache.write(filler, *[[torch.randn_like(t) for t in kv] for kv in before])
    resume(engine)
    after = engine.cache.read(seq.block_table, seq.num_cached)
    assert not seq.preempted and engine.swap_space.used_bytes == 0
    assert all(torch.equal(x, y) for x, y in zip(before[0] + before[1], after[0] + after[1], strict=True))


def test_recompute_rebuilds_the_kv_of_prompt_and_outputs(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=16, block_size=4, preemption="recompute")
    engine.prefill([_req("a", 10, 20, seed=3)])
    for _ in range(5):
        engine.decode()
    seq = engine._seqs["a"]
    before = engine.cache.read(seq.block_table, seq.num_cached)
    preempt(engine, seq)
    assert seq.num_cached == 0 and engine.free_blocks == 16
    resume(engine)
    assert seq.num_cached == 10 + 5 and engine.preemption_stats.recomputed_tokens == 15
    after = engine.cache.read(seq.block_table, seq.num_cached)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(before[0] + before[1], after[0] + after[1],
                                                                  strict=True))


def test_a_full_swap_space_falls_back_to_recompute(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=8, block_size=4, swap_space_bytes=1)
    requests = [_req("a", 8, 20, seed=1), _req("b", 8, 20, seed=2)]
    got = run_fcfs(engine, requests)
    assert engine.preemption_stats.preemptions > 0 and engine.preemption_stats.swapped_tokens == 0
    assert engine.preemption_stats.recomputed_tokens > 0
    assert got == _solo(llama_dir, requests)


def test_host_swap_space_budget():
    space = HostSwapSpace(100)
    assert space.max_bytes == 100 and space.used_bytes == 0
    with pytest.raises(ValueError, match="swap space"):
        HostSwapSpace(-1)
