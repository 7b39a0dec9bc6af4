"""Colocated (vLLM-style) simulation: interference, prefill priority, memory bound, replicas."""

from __future__ import annotations

import copy

import pytest
from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.simulator import (
    ColocatedConfig,
    DisaggConfig,
    PhaseShape,
    RequestTooLargeError,
    simulate_colocated,
    simulate_disaggregated,
)
from disagg_planner.workloads import SimRequest, clip_requests, sample_requests

OPT13 = MODEL_PRESETS["opt-13b"]
LAT = LatencyModel.analytic(OPT13, GPU_PRESETS["A100-80GB"], 300.0)
ONE = ColocatedConfig(PhaseShape(1, 1, 1))


def test_lone_request_is_one_prefill_then_decode_rounds() -> None:
    res = simulate_colocated(ONE, LAT, [SimRequest(1.0, 800, 3)]).results[0]
    prefill = LAT.prefill_time(1, 1, [800])
    assert res.ttft == pytest.approx(prefill)
    assert res.e2e == pytest.approx(prefill + LAT.decode_time(1, 1, 1, 801) + LAT.decode_time(1, 1, 1, 802))


def test_interleaved_prefills_slow_down_decoding() -> None:
    long_answer = SimRequest(0.0, 200, 400)
    alone = simulate_colocated(ONE, LAT, [long_answer]).results[0]
    # Prompts that only need prefill keep arriving while the long answer decodes.
    others = [SimRequest(0.5 + 0.25 * i, 1500, 1) for i in range(30)]
    mixed = simulate_colocated(ONE, LAT, [long_answer, *others]).results[0]
    assert mixed.tpot > 1.5 * alone.tpot
    # Disaggregated, the same prompts run on other GPUs and the answer's pace is untouched.
    cfg = DisaggConfig(PhaseShape(1, 1, 1), PhaseShape(1, 1, 1), kv_link_gbps=25.0)
    split = simulate_disaggregated(cfg, LAT, [long_answer, *others]).results[0]
    split_alone = simulate_disaggregated(cfg, LAT, [long_answer]).results[0]
    assert split.tpot == pytest.approx(split_alone.tpot)


def test_prefill_has_priority_over_running_decodes() -> None:
    decoding = SimRequest(0.0, 100, 1000)
    arriving = SimRequest(1.0, 100, 1)
    res = simulate_colocated(ONE, LAT, [decoding, arriving]).results[1]
    # It waits at most for the decode round in progress, then prefills alone.
    assert res.ttft <= LAT.prefill_time(1, 1, [100]) + LAT.decode_time(1, 1, 1, 2000)


def _overlapped(latency: LatencyModel) -> LatencyModel:
    """The same model for an engine that overlaps decode steps (ShapeProfile.overlapped_decode)."""
    m = copy.copy(latency)
    m.overlapped_shapes = {(1, 1)}
    return m


def test_an_overlapped_engine_prefills_an_arrival_one_decode_round_later() -> None:
    decoding, arriving = SimRequest(0.0, 100, 1000), SimRequest(1.0, 100, 1)
    plain = simulate_colocated(ONE, LAT, [decoding, arriving]).results[1]
    over = simulate_colocated(ONE, _overlapped(LAT), [decoding, arriving]).results[1]
    # The round in flight when it arrives was launched with the one after it: that one runs first.
    one_round = LAT.decode_time(1, 1, 1, 100 + int(1.0 / LAT.decode_time(1, 1, 1, 200)))
    assert over.ttft - plain.ttft == pytest.approx(one_round, rel=0.02)


def test_an_overlapped_engine_prefills_at_once_when_no_decode_round_runs() -> None:
    # Idle, or right after a prefill (the host waits for its first tokens), nothing was launched ahead.
    idle = [SimRequest(1.0, 300, 1)]
    after_prefill = [SimRequest(0.0, 4000, 1), SimRequest(0.001, 100, 1)]
    for trace in (idle, after_prefill):
        plain = simulate_colocated(ONE, LAT, trace).results
        over = simulate_colocated(ONE, _overlapped(LAT), trace).results
        assert [r.ttft for r in over] == pytest.approx([r.ttft for r in plain])


def test_an_overlapped_engine_runs_the_round_launched_behind_a_prefill_before_the_next_prefill() -> None:
    # A long prompt arrives while one request decodes; a short one arrives during that prompt's prefill.
    # Overlapped, the decode round after the prefill was launched with it: the short one waits for it.
    mid_prefill = 1.05 + LAT.prefill_time(1, 1, [4000]) / 2
    trace = [SimRequest(0.0, 100, 1000), SimRequest(1.0, 4000, 2), SimRequest(mid_prefill, 100, 1)]
    plain = simulate_colocated(ONE, LAT, trace).results
    over = simulate_colocated(ONE, _overlapped(LAT), trace).results
    assert plain[1].ttft + 1.0 > mid_prefill > plain[1].ttft + 1.0 - LAT.prefill_time(1, 1, [4000]) + 0.05
    ctx = 100 + 1 + int(1.0 / LAT.decode_time(1, 1, 1, 200))  # about where the decoding request is by then
    two_seq_round = LAT.decode_time(1, 1, 2, ctx + 4001)
    # The long prompt: prefilled a round later, as any arrival during a decode round.
    one_round = LAT.decode_time(1, 1, 1, ctx)
    assert over[1].ttft - plain[1].ttft == pytest.approx(one_round, rel=0.05)
    # The short one: also after the round both decoding requests take behind the long prefill.
    assert over[2].ttft - plain[2].ttft == pytest.approx(one_round + two_seq_round, rel=0.05)


def test_an_overlapped_decode_instance_starts_a_landed_request_one_round_later() -> None:
    cfg = DisaggConfig(PhaseShape(1, 1, 1), PhaseShape(1, 1, 1), kv_link_gbps=25.0)
    trace = [SimRequest(0.0, 100, 2000), SimRequest(1.0, 100, 50)]
    plain = simulate_disaggregated(cfg, LAT, trace).results[1]
    over = simulate_disaggregated(cfg, _overlapped(LAT), trace).results[1]
    assert over.ttft == pytest.approx(plain.ttft)  # its first token comes from the prefill instance
    one_round = LAT.decode_time(1, 1, 1, 100 + int(1.0 / LAT.decode_time(1, 1, 1, 200)))
    assert over.e2e - plain.e2e == pytest.approx(one_round, rel=0.05)


def _served(latency: LatencyModel, behind_decode_s: float) -> LatencyModel:
    """`latency` with a served profile whose prefills beside decodes take `behind_decode_s` more."""
    from disagg_planner.api import ServedOverhead

    m = copy.copy(latency)
    m.served = ServedOverhead(prefill_behind_decode_s=behind_decode_s)
    return m


def test_a_prefill_beside_decodes_takes_the_served_credit_and_one_from_idle_does_not() -> None:
    decoding, arriving = SimRequest(0.0, 100, 1000), SimRequest(1.0, 100, 1)
    credit = 0.2 * LAT.prefill_time(1, 1, [100])
    base = simulate_colocated(ONE, LAT, [decoding, arriving]).results
    served = simulate_colocated(ONE, _served(LAT, -credit), [decoding, arriving]).results
    assert served[0].ttft == pytest.approx(base[0].ttft)  # the first prefill runs from idle: as profiled
    assert served[1].ttft == pytest.approx(base[1].ttft - credit, rel=1e-3)  # the second beside a decode
    assert served[0].e2e == pytest.approx(base[0].e2e - credit, rel=1e-3)  # and the decoder waits that less
    slower = simulate_colocated(ONE, _served(LAT, credit), [decoding, arriving]).results
    assert slower[1].ttft == pytest.approx(base[1].ttft + credit, rel=1e-3)


def test_no_served_credit_hides_more_than_half_a_prefill() -> None:
    decoding, arriving = SimRequest(0.0, 100, 1000), SimRequest(1.0, 100, 1)
    prefill = LAT.prefill_time(1, 1, [100])
    base = simulate_colocated(ONE, LAT, [decoding, arriving]).results[1]
    capped = simulate_colocated(ONE, _served(LAT, -10 * prefill), [decoding, arriving]).results[1]
    assert capped.ttft == pytest.approx(base.ttft - prefill / 2, rel=1e-3)


def test_kv_memory_bounds_the_running_batch() -> None:
    cfg = ColocatedConfig(PhaseShape(1, 1, 1), mem_util=0.4)
    burst = [SimRequest(0.0, 1000, 1000) for _ in range(40)]
    res = simulate_colocated(cfg, LAT, burst)
    assert 0 < res.peak_kv_tokens[0] <= res.kv_capacity_tokens < 40 * 2000
    assert all(r.e2e > r.ttft for r in res.results)


def test_replicas_share_the_load_and_results_repeat() -> None:
    reqs = clip_requests(sample_requests(WorkloadSpec(rate=1.0), 4.0, 600, seed=2), OPT13.max_context)
    one = simulate_colocated(ONE, LAT, reqs)
    two = simulate_colocated(ColocatedConfig(PhaseShape(1, 1, 2)), LAT, reqs)
    assert two.mean_ttft < one.mean_ttft and len(two.peak_kv_tokens) == 2
    assert simulate_colocated(ONE, LAT, reqs).results == one.results


def test_tensor_parallel_replica_is_faster() -> None:
    reqs = clip_requests(sample_requests(WorkloadSpec(rate=1.0), 2.0, 400, seed=8), OPT13.max_context)
    tp1 = simulate_colocated(ONE, LAT, reqs)
    tp2 = simulate_colocated(ColocatedConfig(PhaseShape(2, 1, 1)), LAT, reqs)
    assert tp2.mean_ttft < tp1.mean_ttft and tp2.mean_tpot < tp1.mean_tpot


def test_request_larger_than_memory_is_rejected() -> None:
    with pytest.raises(RequestTooLargeError, match="colocated instance holds"):
        simulate_colocated(ONE, LAT, [SimRequest(0.0, 100_000, 10)])
