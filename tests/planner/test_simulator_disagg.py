"""Disaggregated simulation: determinism, decode timing, KV transfer, pull model, pipeline, errors."""

from __future__ import annotations

import pytest
from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, WorkloadSpec
from disagg_planner.latency import LatencyModel, kv_transfer_time
from disagg_planner.simulator import (
    DisaggConfig,
    ModelDoesNotFitError,
    PhaseShape,
    RequestTooLargeError,
    SimulationError,
    simulate_disaggregated,
)
from disagg_planner.workloads import SimRequest, clip_requests, sample_requests

OPT13 = MODEL_PRESETS["opt-13b"]
LAT = LatencyModel.analytic(OPT13, GPU_PRESETS["A100-80GB"], 300.0)
CFG = DisaggConfig(prefill=PhaseShape(2, 1, 1), decode=PhaseShape(1, 1, 1), kv_link_gbps=25.0)


def chatbot(rate: float, n: int, seed: int) -> list[SimRequest]:
    return clip_requests(sample_requests(WorkloadSpec(rate=rate), rate, n, seed), OPT13.max_context)


def test_same_seed_same_result_different_seed_differs() -> None:
    a = simulate_disaggregated(CFG, LAT, chatbot(3.0, 400, seed=1))
    b = simulate_disaggregated(CFG, LAT, chatbot(3.0, 400, seed=1))
    c = simulate_disaggregated(CFG, LAT, chatbot(3.0, 400, seed=2))
    assert a.results == b.results
    assert a.results != c.results


def test_single_request_latency_is_prefill_transfer_and_decode_rounds() -> None:
    req = SimRequest(arrival=0.5, input_len=1000, output_len=4)
    res = simulate_disaggregated(CFG, LAT, [req]).results[0]
    prefill = LAT.prefill_time(2, 1, [1000])
    transfer = kv_transfer_time(OPT13, 1000, 25.0)
    rounds = sum(LAT.decode_time(1, 1, 1, 1000 + k) for k in (1, 2, 3))  # context grows one token per round
    assert res.ttft == pytest.approx(prefill)
    assert res.e2e == pytest.approx(prefill + transfer + rounds)
    assert res.tpot == pytest.approx((transfer + rounds) / 3)


def test_single_token_outputs_never_reach_decode() -> None:
    res = simulate_disaggregated(CFG, LAT, [SimRequest(0.0, 300, 1)])
    assert res.results[0].tpot == 0 and res.results[0].e2e == res.results[0].ttft
    assert res.peak_kv_tokens == [0]


def test_slow_kv_link_costs_tpot_not_ttft() -> None:
    reqs = chatbot(2.0, 300, seed=4)
    fast = simulate_disaggregated(CFG, LAT, reqs)
    slow = simulate_disaggregated(DisaggConfig(CFG.prefill, CFG.decode, kv_link_gbps=0.5), LAT, reqs)
    assert slow.ttfts.tolist() == fast.ttfts.tolist()
    assert slow.mean_tpot > fast.mean_tpot


def test_pull_model_never_exceeds_decode_memory() -> None:
    cfg = DisaggConfig(prefill=PhaseShape(4, 1, 2), decode=PhaseShape(1, 1, 1), kv_link_gbps=25.0, mem_util=0.4)
    capacity = LAT.kv_capacity_tokens(1, 1, 0.4)
    burst = [SimRequest(0.001 * i, 1500, 500) for i in range(60)]  # 120k KV tokens, far above capacity
    assert 60 * 2000 > 3 * capacity
    res = simulate_disaggregated(cfg, LAT, burst)
    assert res.kv_capacity_tokens == capacity
    assert 0 < res.peak_kv_tokens[0] <= capacity
    assert all(r.e2e > r.ttft for r in res.results)  # everyone is eventually served
    # Late requests wait in prefill memory for room: their time to finish decode is much longer.
    tpots = [r.tpot for r in res.results]
    assert max(tpots) > 3 * min(tpots)


def test_decode_work_spreads_over_instances() -> None:
    reqs = chatbot(6.0, 600, seed=9)
    one = simulate_disaggregated(DisaggConfig(PhaseShape(2, 1, 2), PhaseShape(1, 1, 1), 25.0), LAT, reqs)
    two = simulate_disaggregated(DisaggConfig(PhaseShape(2, 1, 2), PhaseShape(1, 1, 2), 25.0), LAT, reqs)
    assert two.mean_tpot < one.mean_tpot
    assert len(two.peak_kv_tokens) == 2 and min(two.peak_kv_tokens) > 0


def test_more_prefill_instances_cut_queueing() -> None:
    reqs = chatbot(8.0, 800, seed=5)
    one = simulate_disaggregated(DisaggConfig(PhaseShape(1, 1, 1), PhaseShape(1, 1, 4), 25.0), LAT, reqs)
    two = simulate_disaggregated(DisaggConfig(PhaseShape(1, 1, 2), PhaseShape(1, 1, 4), 25.0), LAT, reqs)
    assert two.mean_ttft < one.mean_ttft / 2


def test_prefill_pipeline_runs_micro_batches_as_the_runtime_does() -> None:
    one = [SimRequest(0.0, 2000, 1)]
    cfg = DisaggConfig(PhaseShape(1, 2, 1), PhaseShape(1, 1, 1), 25.0, prefill_token_budget=2000)
    stage = LAT.prefill_time(1, 2, [2000])
    send = 2000 * OPT13.hidden_size * 2 / 300e9
    assert simulate_disaggregated(cfg, LAT, one).results[0].ttft == pytest.approx(2 * stage + send)
    # A burst of ten one-prompt batches: the runtime starts a batch once the previous left the last stage.
    burst = [SimRequest(0.0, 2000, 1) for _ in range(10)]
    ttfts = sorted(r.ttft for r in simulate_disaggregated(cfg, LAT, burst).results)
    assert ttfts[-1] == pytest.approx(10 * (2 * stage + send))
    # Two prompts in one batch: two micro-batches, the second one stage-time behind the first.
    pair = [SimRequest(0.0, 1000, 1), SimRequest(0.0, 1000, 1)]
    half = LAT.prefill_time(1, 2, [1000])
    ttfts = [r.ttft for r in simulate_disaggregated(cfg, LAT, pair).results]
    assert ttfts == pytest.approx([3 * half + send / 2] * 2)


def test_results_follow_the_callers_order() -> None:
    reqs = [SimRequest(2.0, 100, 3), SimRequest(0.0, 1500, 2), SimRequest(1.0, 10, 5)]
    res = simulate_disaggregated(CFG, LAT, reqs).results
    alone = [simulate_disaggregated(CFG, LAT, [r]).results[0] for r in reqs]
    assert [r.ttft for r in res] == pytest.approx([r.ttft for r in alone])


def test_impossible_requests_and_shapes_fail_clearly() -> None:
    with pytest.raises(RequestTooLargeError, match="clip the trace"):
        simulate_disaggregated(CFG, LAT, [SimRequest(0.0, 200_000, 2)])
    big = LatencyModel.analytic(MODEL_PRESETS["opt-175b"], GPU_PRESETS["A100-80GB"], 300.0)
    with pytest.raises(ModelDoesNotFitError, match="raise tp or pp") as err:
        simulate_disaggregated(CFG, big, [SimRequest(0.0, 10, 2)])
    assert isinstance(err.value, ValueError)
    with pytest.raises(SimulationError, match="instances"):
        PhaseShape(1, 1, 0)
    with pytest.raises(SimulationError, match="output_len"):
        simulate_disaggregated(CFG, LAT, [SimRequest(0.0, 10, 0)])


def test_empty_trace() -> None:
    res = simulate_disaggregated(CFG, LAT, [])
    assert res.results == [] and res.attainment(1.0, 1.0) == 0.0


def test_attainment_counts_both_objectives() -> None:
    res = simulate_disaggregated(CFG, LAT, chatbot(2.0, 300, seed=3))
    loose = res.attainment(10.0, 10.0)
    assert loose == 1.0
    assert res.attainment(res.p90_ttft, 10.0) == pytest.approx(0.9, abs=0.01)
    assert res.attainment(res.p90_ttft, res.p90_tpot) <= res.attainment(res.p90_ttft, 10.0)


def test_a_fitted_profile_drives_the_simulation() -> None:
    from disagg_planner.api import DecodeSample, LatencyProfile, PrefillSample, ShapeProfile

    # A profile that says prefill costs 1 ms per token and a decode step 10 ms flat.
    prefill = [PrefillSample(batch_size=1, sum_tokens=n, sum_sq_tokens=n * n, seconds=n * 1e-3) for n in (10, 100, 1000)]
    decode = [DecodeSample(batch_size=b, sum_context=b * 100, seconds=0.01) for b in (1, 4, 16)]
    profile = LatencyProfile(model=OPT13, gpu="A100-80GB", shapes=[ShapeProfile(prefill=prefill, decode=decode)])
    lat = LatencyModel.from_profile(profile, GPU_PRESETS["A100-80GB"], 300.0)
    cfg = DisaggConfig(PhaseShape(1, 1, 1), PhaseShape(1, 1, 1), kv_link_gbps=1e6)
    res = simulate_disaggregated(cfg, lat, [SimRequest(0.0, 500, 11)]).results[0]
    assert res.ttft == pytest.approx(0.5, rel=1e-6)
    assert res.tpot == pytest.approx(0.01, rel=1e-3)
