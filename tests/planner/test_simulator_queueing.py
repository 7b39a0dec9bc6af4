"""The simulator against queueing theory: one prefill instance with fixed lengths is an M/D/1 queue."""

from __future__ import annotations

import numpy as np
import pytest
from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, LengthHistogram, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.simulator import DisaggConfig, PhaseShape, simulate_disaggregated
from disagg_planner.workloads import sample_requests

INPUT = 512


def fixed_workload(input_len: int, output_len: int) -> WorkloadSpec:
    return WorkloadSpec(
        rate=1.0, dataset=None,
        input_lengths=LengthHistogram(edges=[input_len, input_len + 1], counts=[1]),
        output_lengths=LengthHistogram(edges=[output_len, output_len + 1], counts=[1]),
    )


@pytest.mark.parametrize(("rho", "n", "seeds"), [(0.5, 60_000, 2), (0.8, 100_000, 3)])
def test_mean_ttft_matches_md1(rho: float, n: int, seeds: int) -> None:
    latency = LatencyModel.analytic(MODEL_PRESETS["opt-13b"], GPU_PRESETS["A100-80GB"], 300.0)
    service = latency.prefill_time(1, 1, [INPUT])  # deterministic: every batch is one 512-token prompt
    cfg = DisaggConfig(prefill=PhaseShape(1, 1, 1), decode=PhaseShape(1, 1, 1), kv_link_gbps=25.0,
                       prefill_token_budget=INPUT)  # the budget admits exactly one prompt per batch
    means = []
    for seed in range(seeds):
        reqs = sample_requests(fixed_workload(INPUT, 1), rate=rho / service, n=n, seed=seed)
        means.append(simulate_disaggregated(cfg, latency, reqs).mean_ttft)
    md1 = service + rho * service / (2 * (1 - rho))
    assert float(np.mean(means)) == pytest.approx(md1, rel=0.03)


def test_a_burst_is_served_in_budget_sized_batches() -> None:
    latency = LatencyModel.analytic(MODEL_PRESETS["opt-13b"], GPU_PRESETS["A100-80GB"], 300.0)
    from disagg_planner.workloads import SimRequest

    burst = [SimRequest(1.0, 512, 1) for _ in range(8)]
    cfg = DisaggConfig(PhaseShape(1, 1, 1), PhaseShape(1, 1, 1), 25.0, prefill_token_budget=2048)
    ttfts = sorted(r.ttft for r in simulate_disaggregated(cfg, latency, burst).results)
    batch = latency.prefill_time(1, 1, [512] * 4)
    # Two batches of four prompts: the first four finish together, the next four one batch later.
    assert ttfts[:4] == pytest.approx([batch] * 4)
    assert ttfts[4:] == pytest.approx([2 * batch] * 4)
