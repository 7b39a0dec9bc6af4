"""Drift detection: thresholds, anchored hysteresis, too-few-samples, and state in the status."""

from __future__ import annotations

import json
import math

import pytest
from disagg_operator.telemetry import (
    DriftDetector,
    DriftState,
    Reading,
    ReplanStatus,
    WorkloadObservation,
    from_buckets,
    rebin,
)
from disagg_planner.api import LengthHistogram, ReplanSpec, WorkloadSpec
from disagg_planner.workloads import dataset_histograms

# The runtime's token-length buckets (a prefix of them: enough for these lengths).
GRID = (1, 8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)
PLAN = WorkloadSpec(rate=5.0, dataset=None, input_lengths=LengthHistogram(edges=[90, 111], counts=[1]),
                    output_lengths=LengthHistogram(edges=[18, 23], counts=[1]))


def _on_grid(length: int, n: float) -> LengthHistogram:
    hist = from_buckets([*((le, n if length <= le else 0.0) for le in GRID), (math.inf, n)]).histogram
    assert hist is not None
    return hist


def observe(rate: float, prompt: int = 100, output: int = 20, *, window: float = 600.0,
            requests: float | None = None, lengths: bool = True) -> WorkloadObservation:
    """What Prometheus would report for constant lengths at `rate` over a full window."""
    n = rate * window if requests is None else requests
    return WorkloadObservation(time=1e9, window_s=window, covered_s=window, requests=n, rate_rps=n / window,
                               input_lengths=_on_grid(prompt, n) if lengths else None,
                               output_lengths=_on_grid(output, n) if lengths else None)


def run(detector: DriftDetector, rates: list[float], plan: WorkloadSpec = PLAN) -> list[str]:
    state, kinds = DriftState(), []
    for rate in rates:
        decision = detector.step(state, plan, observe(rate))
        state = decision.state
        kinds.append(decision.kind)
    return kinds


def test_a_workload_matching_the_plan_is_steady_at_bucket_resolution() -> None:
    decision = DriftDetector().step(DriftState(), PLAN, observe(5.0))
    assert decision.kind == "steady" and not decision.replan
    assert decision.reading == decision.planned  # 100 and 90..110 both read as bucket (64, 128]
    assert "within thresholds" in decision.reason


def test_a_dataset_plan_is_compared_through_the_observed_buckets() -> None:
    # Traffic drawn from the chatbot shape, as the runtime's buckets see it, is no drift, although the
    # bucket midpoints move the means by far more than the 20 % threshold would allow raw.
    inputs, outputs = dataset_histograms("chatbot")
    grid = [1, *(le + 1 for le in GRID)]
    n = 3000.0
    scale = n / sum(inputs.counts)
    obs_in = rebin(LengthHistogram(edges=inputs.edges, counts=[c * scale for c in inputs.counts]), grid)
    scale = n / sum(outputs.counts)
    obs_out = rebin(LengthHistogram(edges=outputs.edges, counts=[c * scale for c in outputs.counts]), grid)
    obs = WorkloadObservation(time=0, window_s=600, covered_s=600, requests=n, rate_rps=5.0,
                              input_lengths=obs_in, output_lengths=obs_out)
    plan = WorkloadSpec(rate=5.0, dataset="chatbot")
    decision = DriftDetector(stable_intervals=1).step(DriftState(), plan, obs)
    assert decision.kind == "steady", decision.reason
    assert decision.reading is not None and decision.reading.input_mean == pytest.approx(obs_in.mean)


def test_sustained_rate_change_re_plans_after_stable_intervals() -> None:
    detector = DriftDetector(rate_change=0.2, stable_intervals=2)
    first = detector.step(DriftState(), PLAN, observe(6.5))
    assert first.kind == "drifting" and first.state.streak == 1
    assert first.state.anchor == Reading(6.5, 96.5, 24.5)
    second = detector.step(first.state, PLAN, observe(6.6))
    assert second.kind == "confirmed" and second.replan
    assert second.reason == ("workload drifted for 2 consecutive readings: "
                             "arrival rate 6.6 req/s vs planned 5 (+32%, threshold ±20%)")
    assert second.state == DriftState()  # a fresh start against the new plan
    workload = second.workload
    assert workload is not None and workload.rate == pytest.approx(6.6)
    assert workload.dataset is None
    assert workload.input_lengths == LengthHistogram(edges=[65, 129], counts=[6.6 * 600])


def test_noise_swinging_around_the_plan_never_re_plans() -> None:
    detector = DriftDetector(rate_change=0.2, stable_intervals=2)
    noisy = [5.0 * (1.3 if i % 2 == 0 else 0.7) for i in range(12)]
    kinds = run(detector, noisy)
    assert "confirmed" not in kinds
    assert set(kinds) == {"drifting"}  # each reading drifts, but never the same way twice
    # ... and once the change is sustained, it does
    assert run(detector, [*noisy, 6.5, 6.5])[-2:] == ["drifting", "confirmed"]


def test_a_reading_back_within_thresholds_breaks_the_streak() -> None:
    assert run(DriftDetector(stable_intervals=2), [6.5, 5.2, 6.5, 5.1, 6.5]) == [
        "drifting", "steady", "drifting", "steady", "drifting"]


def test_a_ramp_re_plans_once_it_changes_slower_than_the_threshold() -> None:
    # 6.5 -> 8.0 is +23 % on the anchor (a new streak); 8.0 -> 9.5 is +19 % (the same workload).
    assert run(DriftDetector(stable_intervals=2), [6.5, 8.0, 9.5]) == ["drifting", "drifting", "confirmed"]


def test_too_few_requests_decide_nothing_and_keep_the_streak() -> None:
    detector = DriftDetector(stable_intervals=2, min_requests=50)
    state = detector.step(DriftState(), PLAN, observe(6.5)).state
    thin = detector.step(state, PLAN, observe(0.5, requests=49))
    assert thin.kind == "insufficient" and thin.state == state
    assert "only 49 requests in the last 600 s (need 50" in thin.reason
    assert detector.step(thin.state, PLAN, observe(6.5)).kind == "confirmed"


def test_no_series_decides_nothing_and_says_why() -> None:
    obs = WorkloadObservation(time=0, window_s=600, covered_s=0, requests=0, rate_rps=0, input_lengths=None,
                              output_lengths=None, series_found=False, notes=("no series matches x",))
    decision = DriftDetector().step(DriftState(3, Reading(1.0)), PLAN, obs)
    assert decision.kind == "insufficient" and decision.reason == "no series matches x"
    assert decision.state == DriftState(3, Reading(1.0))


def test_length_drift_alone_re_plans_with_the_observed_lengths() -> None:
    detector = DriftDetector(length_change=0.2, stable_intervals=1)
    decision = detector.step(DriftState(), PLAN, observe(5.0, output=300))
    assert decision.kind == "confirmed"
    assert decision.reason.startswith("workload drifted: mean output length 320.5 tokens vs planned 24.5 (")
    assert "arrival rate" not in decision.reason.split(":", 1)[1]  # only what moved is named
    assert decision.workload is not None and decision.workload.output_lengths is not None
    assert decision.workload.output_lengths.edges == [257, 385]


def test_rate_only_when_no_request_completed() -> None:
    # e.g. everything was rejected: the arrival rate is known, the lengths are not
    decision = DriftDetector(stable_intervals=1).step(DriftState(), PLAN, observe(9.0, lengths=False))
    assert decision.kind == "confirmed"
    assert [c.what for c in decision.changes] == ["arrival rate"]
    assert decision.workload is not None
    assert decision.workload.rate == pytest.approx(9.0)
    assert decision.workload.input_lengths == PLAN.input_lengths  # the plan's lengths are kept


def test_the_detector_is_deterministic() -> None:
    detector = DriftDetector(stable_intervals=3)
    rates = [5.0, 6.5, 3.0, 6.5, 6.6, 6.4, 5.0]
    assert run(detector, rates) == run(detector, rates)


def test_state_round_trips_through_the_status_dict() -> None:
    detector = DriftDetector(stable_intervals=3)
    state = detector.step(detector.step(DriftState(), PLAN, observe(6.5)).state, PLAN, observe(6.6)).state
    assert state.streak == 2 and state.anchor is not None
    wire = json.loads(json.dumps(state.to_wire()))
    assert wire == {"streak": 2, "anchor": {"rateRps": 6.5, "inputMean": 96.5, "outputMean": 24.5}}
    assert DriftState.from_wire(wire) == state
    # inside the resource's status, as an operator restart reads it back
    status = {"phase": "Ready", "replan": json.loads(ReplanStatus(drift=state.to_status()).model_dump_json(
        by_alias=True))}
    restored = DriftState.from_wire(ReplanStatus.from_cr_status(status).drift)
    assert restored == state
    assert detector.step(restored, PLAN, observe(6.5)).kind == "confirmed"
    assert DriftState.from_wire(None) == DriftState()


def test_thresholds_come_from_the_spec_and_are_checked() -> None:
    spec = ReplanSpec(rate_change=0.5, length_change=0.3, stable_intervals=4)
    assert DriftDetector.from_spec(spec, min_requests=10) == DriftDetector(0.5, 0.3, 4, 10, step_change=1.0)
    with pytest.raises(ValueError, match="stable_intervals"):
        DriftDetector(stable_intervals=0)
    with pytest.raises(ValueError, match="min_requests"):
        DriftDetector(min_requests=0)


def test_a_step_past_step_change_confirms_on_one_reading():
    detector = DriftDetector(rate_change=0.2, stable_intervals=3, step_change=1.0)
    decision = detector.step(DriftState(), PLAN, observe(15.0))
    assert decision.kind == "confirmed" and "stepped" in decision.reason
    assert decision.workload is not None and decision.workload.rate == pytest.approx(15.0)


def test_a_change_below_step_change_still_waits_for_the_streak():
    detector = DriftDetector(rate_change=0.2, stable_intervals=3, step_change=1.0)
    assert detector.step(DriftState(), PLAN, observe(9.0)).kind == "drifting"


def test_spec_sets_min_requests_and_step_change():
    from disagg_planner.api import ReplanSpec

    detector = DriftDetector.from_spec(ReplanSpec(min_requests=10, step_change=None))
    assert detector.min_requests == 10 and detector.step_change is None
