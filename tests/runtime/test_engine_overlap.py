"""Overlapped decoding (engine/overlap.py): the host's work on step n runs while step n+1 computes, and
nothing a request sees changes: the same tokens and text, stops and lengths honoured, aborts and
preemption safe, no block left behind. On CPU both the torch path and the fused runner's eager path run
overlapped; on CUDA the captured graphs do."""

from __future__ import annotations

import pytest
import torch
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.engine.gpu import FusedLlama, GpuStepRunner
from disagg_runtime.engine.overlap import gathered
from disagg_runtime.engine.testing import run_fcfs
from disagg_runtime.models.testing import write_random_model


def _req(rid: str, n: int, max_tokens: int, *, seed: int, sample_seed: int | None = None,
         **sampling) -> GenerationRequest:
    ids = torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, seed=sample_seed, **sampling))


def _mixed_requests(prefix: str = "r") -> list[GenerationRequest]:
    """Greedy and seeded sampling, EOS on and off, lengths that end at different steps."""
    return [
        _req(f"{prefix}0", 5, 9, seed=1, ignore_eos=True),
        _req(f"{prefix}1", 17, 4, seed=2, temperature=0.8, sample_seed=11),
        _req(f"{prefix}2", 3, 12, seed=3),  # may stop at EOS before max_tokens
        _req(f"{prefix}3", 30, 1, seed=4, ignore_eos=True),  # done at its first token
        _req(f"{prefix}4", 9, 7, seed=5, temperature=1.0, top_p=0.9, sample_seed=12, ignore_eos=True),
    ]


def _drive(engine: Engine, *, abort_at: int | None = None, during_prefill: list | None = None,
           overlapped_prefill: bool = False) -> dict[str, tuple[list[int], str, str | None]]:
    """Prefill a first group, a second group mid-decode, optionally abort one request; run to the end.

    With `during_prefill`, the mid-decode prefill hands the in-flight step's tokens over as it runs
    (`on_decoded`), and they are appended to that list too; `overlapped_prefill` leaves each prefill's
    first tokens in flight for the next decode call."""
    got: dict[str, list] = {}

    def take(outputs):
        for o in outputs:
            tokens, text, _ = got.setdefault(o.request_id, ([], [""], [None]))
            tokens.append(o.token_id)
            text[0] += o.text
            if o.finished:
                got[o.request_id][2][0] = o.finish_reason

    take(engine.prefill(_mixed_requests("a"), overlapped=overlapped_prefill))
    step = 0
    while engine.has_decode_work:
        if step == 3:
            if during_prefill is None:
                take(engine.prefill(_mixed_requests("b"), overlapped=overlapped_prefill))
            else:
                def decoded(outputs):
                    during_prefill.extend(outputs)
                    take(outputs)

                take(engine.prefill(_mixed_requests("b"), on_decoded=decoded, overlapped=overlapped_prefill))
        if abort_at is not None and step == abort_at:
            engine.abort("a0")
        take(engine.decode())
        step += 1
        assert step < 200
    return {rid: (t, x[0], f[0]) for rid, (t, x, f) in got.items()}


def _engines(path, **kw) -> tuple[Engine, Engine]:
    return Engine.load(path, overlap_decode=False, **kw), Engine.load(path, overlap_decode=True, **kw)


def test_overlapped_decode_gives_the_same_tokens_text_and_finish_reasons(llama_dir):
    plain, overlapped = _engines(llama_dir)
    want, got = _drive(plain), _drive(overlapped)
    assert got == want
    assert len(got) == 10 and all(reason in ("stop", "length") for _, _, reason in got.values())
    for engine in (plain, overlapped):  # every block is back once the last step is taken
        assert engine.free_blocks == engine.total_blocks and not engine.request_ids


def test_a_prefill_hands_over_the_step_in_flight_before_its_own_tokens(llama_dir):
    plain, overlapped = _engines(llama_dir)
    early: list = []
    want, got = _drive(plain), _drive(overlapped, during_prefill=early)
    assert got == want
    # The in-flight step's tokens came during the prefill, one per sequence still decoding then.
    assert early and {o.request_id for o in early} <= {"a0", "a1", "a2", "a4"}
    assert len({o.request_id for o in early}) == len(early)
    assert not overlapped.decode_in_flight and overlapped.free_blocks == overlapped.total_blocks
    # Nothing in flight (a synchronous engine): the callback is not called.
    calls: list = []
    plain.prefill([_req("z", 4, 2, seed=9)], on_decoded=calls.append)
    assert calls == []


@pytest.mark.parametrize("abort_at", [None, 3])
def test_an_overlapped_prefill_leaves_its_first_tokens_to_the_next_step(llama_dir, abort_at):
    plain, overlapped = _engines(llama_dir)
    want = _drive(plain, abort_at=abort_at)
    got = _drive(overlapped, abort_at=abort_at, during_prefill=[], overlapped_prefill=True)
    assert got == want  # abort_at=3 aborts a0 right after the second prefill, with that prefill in flight
    assert overlapped.free_blocks == overlapped.total_blocks and not overlapped.request_ids

    engine = Engine.load(llama_dir, overlap_decode=True)
    assert engine.prefill([_req("x", 6, 4, seed=1, ignore_eos=True)], overlapped=True) == []
    assert engine.decode_in_flight
    first = engine.decode()  # launches token 2 from the device's copy of token 1, returns token 1
    assert [o.request_id for o in first] == ["x"] and engine.decode_in_flight
    # On a synchronous engine, and for a prefill-only engine, the flag changes nothing.
    assert len(plain.prefill([_req("y", 6, 4, seed=1)], overlapped=True)) == 1
    assert len(engine.prefill([_req("z", 6, 4, seed=2)], reserve_decode=False, overlapped=True)) == 1


def test_a_sequence_is_never_stepped_past_max_tokens(llama_dir):
    engine = Engine.load(llama_dir, overlap_decode=True)
    engine.prefill([_req("x", 6, 3, seed=1, ignore_eos=True)])
    first = engine.decode()  # launches token 2, returns nothing yet
    assert first == [] and engine.decode_in_flight
    second = engine.decode()  # token 3 launched before token 2 is read; no step for a 4th
    third = engine.decode()
    assert [o.token_id for o in second + third] and len(second + third) == 2 and (second + third)[-1].finished
    assert not engine.decode_in_flight and not engine.has_decode_work
    assert engine.free_blocks == engine.total_blocks


def test_aborting_a_request_with_a_step_in_flight_loses_nothing_else(llama_dir):
    plain, overlapped = _engines(llama_dir)
    want, got = _drive(plain, abort_at=2), _drive(overlapped, abort_at=2)
    assert "a0" in got and got["a0"][2] is None  # aborted: no finishing token
    assert {k: v for k, v in got.items() if k != "a0"} == {k: v for k, v in want.items() if k != "a0"}
    assert overlapped.free_blocks == overlapped.total_blocks


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_under_overlap_keeps_the_tokens(llama_dir, mode):
    # 14 blocks of 16 tokens for four requests that need 4-5 blocks each over their lives: steps preempt.
    reqs = [_req(f"p{i}", 20 + 7 * i, 40, seed=i, ignore_eos=True) for i in range(4)]
    results = []
    for overlap_decode in (False, True):
        engine = Engine.load(llama_dir, num_blocks=14, preemption=mode, overlap_decode=overlap_decode)
        out = run_fcfs(engine, reqs)
        assert engine.preemption_stats.preemptions > 0
        assert engine.free_blocks == engine.total_blocks
        results.append(out)
    assert results[1] == results[0]
    assert all(len(v) == 40 for v in results[1].values())


def test_a_mixed_step_after_an_overlapped_step_returns_its_tokens_first(llama_dir):
    plain, overlapped = _engines(llama_dir)
    streams = []
    for engine in (plain, overlapped):
        got: dict[str, list[int]] = {}
        for o in engine.prefill([_req("d", 8, 10, seed=1, ignore_eos=True)]):
            got.setdefault(o.request_id, []).append(o.token_id)
        for _ in range(3):
            for o in engine.decode():
                got.setdefault(o.request_id, []).append(o.token_id)
        engine.admit_chunked(_req("c", 20, 5, seed=2, ignore_eos=True))
        from disagg_runtime.engine.chunked import PrefillChunk

        for chunk in (12, 8):
            for o in engine.mixed_step([PrefillChunk("c", chunk)]):
                got.setdefault(o.request_id, []).append(o.token_id)
        while engine.has_decode_work:
            for o in engine.decode():
                got.setdefault(o.request_id, []).append(o.token_id)
        streams.append(got)
    assert streams[1] == streams[0]
    assert len(streams[1]["d"]) == 10 and len(streams[1]["c"]) == 5


def test_the_fused_runner_gathers_in_flight_ids_on_its_eager_path(llama_dir):
    plain, overlapped = _engines(llama_dir)
    for engine in (plain, overlapped):
        engine.gpu_runner = GpuStepRunner(FusedLlama(engine.model, engine.cache.layers, engine.max_context),
                                          block_size=engine.block_size, max_context=engine.max_context)
    assert _drive(overlapped) == _drive(plain)


def test_gathered_replaces_only_rows_with_a_source():
    ids = torch.tensor([7, 0, 9, 0])
    prev = torch.tensor([100, 101, 102])
    assert gathered(ids, prev, [-1, 2, -1, 0]).tolist() == [7, 102, 9, 100]


def test_overlap_is_on_by_default_only_for_the_fused_gpu_path(llama_dir):
    assert Engine.load(llama_dir).overlap_decode is False


@pytest.mark.gpu
def test_overlapped_graph_steps_give_the_plain_steps_tokens_on_cuda(tmp_path):
    # Head dim 128 as the GPU kernels expect; a fixed cache, or the first engine takes 90% of the card.
    path = write_random_model(tmp_path, arch="llama", seed=9, num_hidden_layers=2, hidden_size=256,
                              intermediate_size=512, num_attention_heads=2, num_key_value_heads=1)
    plain = Engine.load(path, device="cuda", num_blocks=512, overlap_decode=False)
    overlapped = Engine.load(path, device="cuda", num_blocks=512)
    assert overlapped.overlap_decode and overlapped.gpu_runner is not None and overlapped.gpu_runner.sizes

    early: list = []

    def run(engine):
        # ignore_eos with lengths that end at different steps: the batches of both runs are the same rows.
        reqs = [_req(f"g{i}", 5 + 3 * i, 4 + (i * 5) % 17, seed=i, ignore_eos=True) for i in range(24)]
        got: dict[str, list[int]] = {}
        early.clear()
        for o in engine.prefill(reqs[:16], overlapped=True):  # in flight on the overlapped engine
            got.setdefault(o.request_id, []).append(o.token_id)
        step = 0
        while engine.has_decode_work:
            if step == 2:  # with a step in flight on the overlapped engine: its tokens come during the prefill
                def decoded(outputs):
                    early.extend(outputs)
                    for o in outputs:
                        got.setdefault(o.request_id, []).append(o.token_id)

                for o in engine.prefill(reqs[16:], on_decoded=decoded, overlapped=True):
                    got.setdefault(o.request_id, []).append(o.token_id)
            for o in engine.decode():
                got.setdefault(o.request_id, []).append(o.token_id)
            step += 1
        return got

    want = run(plain)
    assert early == []  # nothing in flight on the synchronous engine
    got = run(overlapped)
    assert len(early) == 16  # the step launched before the second prefill: one token of each first request
    assert plain.preemption_stats.preemptions == overlapped.preemption_stats.preemptions == 0
    assert {rid: got[rid] for rid in got if got[rid] != want[rid]} == {}
    assert got == want
    assert overlapped.free_blocks == overlapped.total_blocks
