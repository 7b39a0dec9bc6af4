"""Chunked-prefill colocated simulation: bounded decode stalls, prompts split over steps, memory, replicas."""

from __future__ import annotations

import numpy as np
import pytest
from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, MixedSample, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.latency.mixed import chunk_attention, fit_mixed
from disagg_planner.simulator import (
    ChunkedColocatedConfig,
    ColocatedConfig,
    PhaseShape,
    RequestTooLargeError,
    SimulationError,
    simulate_colocated,
    simulate_colocated_chunked,
)
from disagg_planner.workloads import SimRequest, clip_requests, sample_requests

OPT13 = MODEL_PRESETS["opt-13b"]
LAT = LatencyModel.analytic(OPT13, GPU_PRESETS["A100-80GB"], 300.0)


def chunked(budget: int = 512, **kw) -> ChunkedColocatedConfig:
    return ChunkedColocatedConfig(PhaseShape(1, 1, kw.pop("instances", 1)), chunk_token_budget=budget, **kw)


def test_a_lone_prompt_is_prefilled_in_chunks_then_decoded() -> None:
    res = simulate_colocated_chunked(chunked(512), LAT, [SimRequest(0.0, 1200, 3)]).results[0]
    steps = [LAT.mixed_stage_time(1, 1, 0, 0, 1, n, chunk_attention(o, n)) for o, n in ((0, 512), (512, 512),
                                                                                      (1024, 176))]
    assert res.ttft == pytest.approx(sum(steps))
    assert res.e2e == pytest.approx(sum(steps) + LAT.decode_time(1, 1, 1, 1201) + LAT.decode_time(1, 1, 1, 1202))


def test_chunks_of_one_prompt_add_up_to_its_attention() -> None:
    offsets = [(0, 300), (300, 300), (600, 57)]
    assert sum(chunk_attention(o, n) for o, n in offsets) == 657 ** 2


def test_mixed_step_costs_at_least_its_decode_and_less_than_both_apart() -> None:
    decode = LAT.decode_time(1, 1, 32, 32 * 600)
    prefill = LAT.prefill_stage_time(1, 1, 1, 480, 480 ** 2)
    mixed = LAT.mixed_stage_time(1, 1, 32, 32 * 600, 1, 480, 480 ** 2)
    assert decode <= mixed < decode + prefill  # one weight read serves both


def test_decodes_stall_only_for_a_bounded_step_while_long_prompts_arrive() -> None:
    long_answer = SimRequest(0.0, 200, 400)
    others = [SimRequest(0.5 + 0.25 * i, 1500, 1) for i in range(30)]
    prio = simulate_colocated(ColocatedConfig(PhaseShape(1, 1, 1)), LAT, [long_answer, *others]).results[0]
    chunk = simulate_colocated_chunked(chunked(256), LAT, [long_answer, *others]).results[0]
    assert chunk.tpot < prio.tpot
    # No step is longer than a mixed step of the whole budget.
    worst_step = LAT.mixed_stage_time(1, 1, 1, 600, 1, 255, chunk_attention(1400, 255))
    assert chunk.tpot <= worst_step * 1.001


def test_chunking_lowers_p99_tpot_on_a_long_prompt_workload() -> None:
    workload = WorkloadSpec(rate=1.0, dataset="summarization")
    requests = clip_requests(sample_requests(workload, 1.5, 1500, seed=3), OPT13.max_context)
    prio = simulate_colocated(ColocatedConfig(PhaseShape(1, 1, 1)), LAT, requests)
    chunk = simulate_colocated_chunked(chunked(256), LAT, requests)
    p99 = [float(np.percentile(r.tpots[r.tpots > 0], 99)) for r in (prio, chunk)]
    assert p99[1] < 0.85 * p99[0], p99
    # The price: a long prompt's first token waits for all its chunks.
    assert chunk.p90_ttft > prio.p90_ttft


def test_kv_memory_bounds_admission_and_results_repeat() -> None:
    burst = [SimRequest(0.001 * i, 1000, 1000) for i in range(40)]
    cfg = chunked(512, mem_util=0.4)
    res = simulate_colocated_chunked(cfg, LAT, burst)
    assert 0 < res.peak_kv_tokens[0] <= res.kv_capacity_tokens < 40 * 2000
    assert all(r.e2e > r.ttft > 0 for r in res.results)
    again = simulate_colocated_chunked(cfg, LAT, burst)
    assert [r.e2e for r in again.results] == [r.e2e for r in res.results]


def test_replicas_split_the_trace() -> None:
    reqs = [SimRequest(0.01 * i, 800, 50) for i in range(40)]
    one = simulate_colocated_chunked(chunked(512), LAT, reqs)
    two = simulate_colocated_chunked(chunked(512, instances=2), LAT, reqs)
    assert len(two.peak_kv_tokens) == 2
    assert np.mean(two.e2es) < np.mean(one.e2es)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(SimulationError):
        chunked(1)
    with pytest.raises(RequestTooLargeError):
        simulate_colocated_chunked(chunked(512, mem_util=0.5), LAT, [SimRequest(0.0, 500_000, 10)])


def test_measured_mixed_steps_are_fitted_and_used() -> None:
    def seconds(b: int, ctx: int, n: int, attn: int) -> float:
        return 0.02 + 1e-4 * (b + n) + 2e-9 * attn + 5e-7 * ctx

    samples = [MixedSample(decode_batch=b, decode_context=b * 300, chunks=1, chunk_tokens=n,
                           chunk_attention=chunk_attention(o, n), seconds=seconds(b, b * 300, n, chunk_attention(o, n)))
               for b, n, o in ((1, 64, 0), (8, 256, 256), (32, 512, 0), (64, 128, 1024), (16, 1024, 512))]
    fit = fit_mixed(samples, "test")
    assert fit.rms_relative_error < 1e-6
    assert fit(40, 10_000, 9000) == pytest.approx(seconds(0, 9000, 40, 10_000))
