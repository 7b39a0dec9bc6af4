"""On-demand KV memory in the simulator: the closed-form ledger against a per-round count, preemption
and its cost, the watermark, and max_tokens as the admissibility limit."""

from __future__ import annotations

import random

import numpy as np
import pytest
from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, LengthHistogram, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.latency.memory import mean_kv_tokens, usable_kv_tokens
from disagg_planner.search.capacity import LengthStats, decode_capacity
from disagg_planner.search.shapes import Shape
from disagg_planner.simulator import (
    ColocatedConfig,
    DisaggConfig,
    KVPolicy,
    PhaseShape,
    RequestTooLargeError,
    SimulationError,
    simulate_colocated,
    simulate_disaggregated,
)
from disagg_planner.simulator.kv_blocks import BlockLedger, OnDemandBatch
from disagg_planner.simulator.rounds import RoundCost
from disagg_planner.workloads import SimRequest, sample_requests

LAT = LatencyModel.analytic(MODEL_PRESETS["opt-13b"], GPU_PRESETS["A100-80GB"], 300.0)
ONE = PhaseShape(1, 1, 1)


def test_ledger_growth_and_shortage_match_a_round_by_round_count() -> None:
    rng = random.Random(3)
    for _ in range(200):
        bs = rng.choice([1, 4, 16])
        batch = OnDemandBatch(BlockLedger(rng.randint(40, 400) * bs, KVPolicy(block_size=bs, watermark=0)),
                              KVPolicy(block_size=bs), lambda _t: 0.0, lambda _t: 0.0)
        ledger = batch.ledger
        cached = []
        for j in range(rng.randint(1, 12)):
            c = rng.randint(1, 5 * bs)
            ledger.take(ledger.blocks(c))
            batch.join(j, c, 10**6)
            cached.append(c)
        if ledger.free < 0:
            continue
        r = batch.round
        free = ledger.free
        m = 0  # brute force: rounds r+1, r+2, ... until one needs more blocks than are left
        while True:
            m += 1
            need = sum(1 for c in cached if (c + m) % bs == 0)
            if need > free:
                break
            free -= need
        assert batch.rounds_until_short() == m
        k = rng.randint(1, m)
        expect = sum(1 for step in range(1, k) for c in cached if (c + step) % bs == 0)
        assert ledger.growth(r + 1, r + k, len(cached)) == expect


def test_on_demand_decode_holds_more_requests_than_whole_life_reservation() -> None:
    # Requests that reserve prompt + max_tokens of 2000 but generate 50: memory fits many more of them.
    capacity = LAT.kv_capacity_tokens(1, 1, 0.9)
    n = 3 * capacity // 2000
    burst = [SimRequest(0.0, 200, 50, max_tokens=1800) for _ in range(n)]
    cfg = DisaggConfig(PhaseShape(1, 1, 4), ONE, kv_link_gbps=100.0)
    res = simulate_disaggregated(cfg, LAT, burst)
    assert res.preemptions == 0
    assert res.peak_kv_tokens[0] > (capacity // 2000) * 250  # more than whole-life reservations would hold


def test_decode_preempts_when_outputs_outgrow_memory_and_everyone_finishes() -> None:
    cfg = DisaggConfig(PhaseShape(4, 1, 2), ONE, kv_link_gbps=25.0, mem_util=0.4)
    capacity = LAT.kv_capacity_tokens(1, 1, 0.4)
    burst = [SimRequest(0.001 * i, 200, 1500) for i in range(60)]
    res = simulate_disaggregated(cfg, LAT, burst)
    assert res.preemptions > 0 and res.preempted_tokens > 0
    assert 0 < res.peak_kv_tokens[0] <= capacity
    assert all(r.e2e > r.ttft for r in res.results)
    slow = simulate_disaggregated(
        DisaggConfig(cfg.prefill, cfg.decode, 25.0, mem_util=0.4, kv=KVPolicy(host_link_gbps=0.05)), LAT, burst)
    assert slow.preemptions >= 1 and slow.mean_tpot > res.mean_tpot  # swaps cost time on the host link


def test_colocated_recompute_costs_prefill_time() -> None:
    burst = [SimRequest(0.0, 300, 1200) for _ in range(40)]
    swap = simulate_colocated(ColocatedConfig(ONE, mem_util=0.4), LAT, burst)
    recompute = simulate_colocated(ColocatedConfig(ONE, mem_util=0.4, kv=KVPolicy(preemption="recompute")), LAT,
                                   burst)
    assert swap.preemptions > 0 and recompute.preemptions > 0
    assert recompute.mean_e2e > swap.mean_e2e  # a prefill of the whole context costs more than a PCIe copy


def test_watermark_keeps_admission_slack() -> None:
    ledger = BlockLedger(1000 * 16, KVPolicy(block_size=16, watermark=0.01))
    assert ledger.capacity == 1000 and ledger.watermark == 10
    assert ledger.fits_with_watermark(990) and not ledger.fits_with_watermark(991)
    assert BlockLedger(1000 * 16, KVPolicy(watermark=0.0)).watermark == 0


def test_max_tokens_is_the_admissibility_limit() -> None:
    capacity = LAT.kv_capacity_tokens(1, 1, 0.9)
    too_long = [SimRequest(0.0, 100, 10, max_tokens=capacity)]
    with pytest.raises(RequestTooLargeError, match="max_tokens"):
        simulate_colocated(ColocatedConfig(ONE), LAT, too_long)
    with pytest.raises(SimulationError, match="exceeds its max_tokens"):
        simulate_colocated(ColocatedConfig(ONE), LAT, [SimRequest(0.0, 100, 10, max_tokens=5)])
    assert SimRequest(0.0, 100, 10, max_tokens=4000).clip(2048) == SimRequest(0.0, 100, 10, max_tokens=1948)


def test_bad_policies_are_refused() -> None:
    for bad in ({"block_size": 0}, {"watermark": 1.0}, {"preemption": "drop"}, {"host_link_gbps": 0}):
        with pytest.raises(SimulationError):
            KVPolicy(**bad)


def test_decode_capacity_bound_follows_on_demand_memory() -> None:
    stats = LengthStats.of(np.array([700.0, 800.0]), np.array([150.0, 200.0]))
    shape = Shape(1, 1)
    capacity = LAT.kv_capacity_tokens(1, 1, 0.9)
    assert usable_kv_tokens(capacity, 16, 0.01) == (capacity // 16 - -(-capacity // 16 // 100)) * 16
    assert mean_kv_tokens(750, 175, 16) == 750 + 87.5 + 8
    batch = int(usable_kv_tokens(capacity, 16, 0.01) // mean_kv_tokens(750, 175, 16))
    assert batch > capacity // (750 + 175)  # more than reserving prompt + output for the whole life
    loose = decode_capacity(LAT, shape, stats, 10.0, 300.0, 0.9)
    cost = RoundCost(LAT, 1, 1, 300.0)
    round_time = cost.base(batch) + cost.slope * batch * (750 + 87.5)
    assert loose == pytest.approx(batch / (round_time * 174))


def test_workload_histograms_can_carry_max_tokens() -> None:
    hist = LengthHistogram(edges=[100, 200], counts=[1.0])
    plain = WorkloadSpec(rate=1.0, dataset=None, input_lengths=hist, output_lengths=hist)
    limited = plain.model_copy(update={"max_tokens_lengths": LengthHistogram(edges=[150, 151], counts=[1.0])})
    a, b = sample_requests(plain, 2.0, 50, seed=3), sample_requests(limited, 2.0, 50, seed=3)
    assert [(r.arrival, r.input_len, r.output_len) for r in a] == [(r.arrival, r.input_len, r.output_len) for r in b]
    assert all(r.max_tokens is None for r in a)
    assert all(r.max_tokens == max(150, r.output_len) for r in b)
