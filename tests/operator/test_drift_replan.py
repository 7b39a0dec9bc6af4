"""replan_tick: the check the operator's timer runs, with its status, events and effective spec."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from disagg_operator.telemetry import (
    DriftDetector,
    PrometheusUnavailable,
    ReplanDecision,
    ReplanStatus,
    TelemetryConfigError,
    TelemetryError,
    WorkloadObservation,
    effective_spec,
    from_buckets,
    record_plan,
    replan_due,
    replan_tick,
    telemetry_for,
)
from disagg_planner.api import DisaggServingSpec, LengthHistogram

GRID = (1, 8, 16, 32, 64, 128, 256, 512, 1024)
T0 = 1_800_000_000.0


def make_spec(**replan: Any) -> DisaggServingSpec:
    return DisaggServingSpec.model_validate({
        "model": {"preset": "tiny-llama"},
        "cluster": {"nodes": 1, "gpusPerNode": 4, "gpuType": "CPU"},
        "workload": {"rate": 5.0, "inputLengths": {"edges": [90, 111], "counts": [1]},
                     "outputLengths": {"edges": [18, 23], "counts": [1]}},
        "slo": {"ttftMs": 500, "tpotMs": 100},
        "replan": {"enabled": True, "prometheusUrl": "http://prom:9090", "stableIntervals": 2, **replan},
    })


def observation(rate: float, prompt: int = 100, output: int = 20, at: float = T0) -> WorkloadObservation:
    n = rate * 600

    def hist(length: int) -> LengthHistogram | None:
        return from_buckets([*((le, n if length <= le else 0.0) for le in GRID), (math.inf, n)]).histogram

    return WorkloadObservation(time=at, window_s=600, covered_s=600, requests=n, rate_rps=rate,
                               input_lengths=hist(prompt), output_lengths=hist(output))


@dataclass
class Recorded:
    """A workload source that replays observations (or failures) in order."""

    items: list[WorkloadObservation | TelemetryError]
    asked: list[float | None] = field(default_factory=list)

    async def observe(self, at: float | None = None) -> WorkloadObservation:
        self.asked.append(at)
        item = self.items.pop(0)
        if isinstance(item, TelemetryError):
            raise item
        return item


def written(status: Mapping[str, Any], decision: ReplanDecision) -> dict[str, Any]:
    """The resource's status after the timer's merge patch (through JSON, as the API server stores it)."""
    patch = json.loads(json.dumps(decision.status_patch()))
    return {**status, **patch}


async def test_sustained_drift_re_plans_for_the_observed_workload() -> None:
    spec = make_spec()
    source = Recorded([observation(7.0), observation(7.1)])
    status: dict[str, Any] = {"phase": "Ready"}

    first = await replan_tick(spec, status, source, now=T0)
    assert first.result == "Drifting" and not first.replan and first.event is None
    assert first.status.drift.streak == 1 and first.changed
    status = written(status, first)

    second = await replan_tick(spec, status, source, now=T0 + 300)
    assert second.result == "Replanned" and second.replan
    assert source.asked == [T0, T0 + 300]
    workload = second.workload
    assert workload is not None and workload.rate == pytest.approx(7.1)
    assert workload.input_lengths == LengthHistogram(edges=[65, 129], counts=[7.1 * 600])
    assert second.event is not None and second.event.type == "Normal" and second.event.reason == "WorkloadDrift"
    assert "arrival rate 7.1 req/s vs planned 5 (+42%" in second.event.message
    assert "re-planning for 7.1 req/s, mean prompt 96.5 tokens, mean output 24.5 tokens" in second.event.message
    replan = second.status
    assert replan.observed_workload == workload and replan.drift.streak == 0
    assert replan.replanned_time == "2027-01-15T08:05:00Z" and replan.replan_plan_hash is None
    assert replan.last_observation is not None and replan.last_observation.reading.rate_rps == pytest.approx(7.1)

    status = written(status, second)
    assert status["replan"]["replanPlanHash"] is None  # null in a merge patch clears a stale value
    planned = effective_spec(spec, status)
    assert planned.workload == workload
    assert planned.planning_hash() != spec.planning_hash()  # the operator's plan cache misses: a new search
    assert effective_spec(spec, {"phase": "Ready"}) is spec


async def test_after_a_re_plan_the_observed_workload_is_the_reference() -> None:
    spec = make_spec(stableIntervals=1)
    source = Recorded([observation(7.0), observation(7.2)])
    status = written({}, await replan_tick(spec, {}, source, now=T0))
    again = await replan_tick(spec, status, source, now=T0 + 300)
    assert again.result == "Steady", again.status.message
    assert again.status.observed_workload is not None  # still in force
    assert "arrival rate 7.2 req/s vs planned 7" in again.status.message


async def test_editing_spec_workload_voids_the_observed_one() -> None:
    spec = make_spec(stableIntervals=1)
    status = written({}, await replan_tick(spec, {}, Recorded([observation(7.0)]), now=T0))
    edited = spec.model_copy(update={"workload": spec.workload.model_copy(update={"rate": 6.9})})
    assert effective_spec(edited, status) is edited  # the user's edit wins at once
    tick = await replan_tick(edited, status, Recorded([observation(7.0)]), now=T0 + 300)
    assert tick.result == "Steady"
    assert tick.status.observed_workload is None and tick.status.spec_workload_hash is None
    assert tick.status.message.startswith("spec.workload changed since the last re-plan")


async def test_disabling_re_planning_reverts_to_the_spec_workload() -> None:
    spec = make_spec(stableIntervals=1)
    status = written({}, await replan_tick(spec, {}, Recorded([observation(7.0)]), now=T0))
    disabled = spec.model_copy(update={"replan": spec.replan.model_copy(update={"enabled": False})})
    assert effective_spec(disabled, status) is disabled
    source = Recorded([])
    off = await replan_tick(disabled, status, source, now=T0 + 300)
    assert off.result == "Disabled" and source.asked == []  # Prometheus is not asked
    assert off.changed and off.status.observed_workload is None
    still = await replan_tick(disabled, written(status, off), source, now=T0 + 600)
    assert not still.changed  # nothing to write on later ticks


async def test_telemetry_failure_warns_once_and_keeps_the_streak() -> None:
    spec = make_spec()
    down = PrometheusUnavailable("Prometheus at http://prom:9090 did not answer: refused")
    source = Recorded([observation(7.0), down, down, observation(7.0)])
    status = written({}, await replan_tick(spec, {}, source, now=T0))
    failed = await replan_tick(spec, status, source, now=T0 + 300)
    assert failed.result == "Unavailable" and not failed.replan
    assert failed.event is not None and failed.event.type == "Warning"
    assert failed.event.reason == "TelemetryUnavailable" and "did not answer" in failed.event.message
    assert failed.status.drift.streak == 1
    status = written(status, failed)
    quiet = await replan_tick(spec, status, source, now=T0 + 600)
    assert quiet.result == "Unavailable" and quiet.event is None
    back = await replan_tick(spec, written(status, quiet), source, now=T0 + 900)
    assert back.result == "Replanned"


async def test_too_few_requests_are_reported_in_the_status() -> None:
    spec = make_spec()
    thin = observation(0.05)  # 30 requests in 600 s
    tick = await replan_tick(spec, {}, Recorded([thin]), DriftDetector(min_requests=50), now=T0)
    assert tick.result == "Insufficient" and not tick.replan and tick.event is None
    assert tick.status.message.startswith("only 30 requests in the last 600 s")


def test_checks_are_due_by_the_spec_interval() -> None:
    spec = make_spec(intervalSeconds=300)
    assert replan_due(spec, {}, T0)
    status = {"replan": ReplanStatus(last_check_time="2027-01-15T08:00:00Z").to_wire()}
    assert not replan_due(spec, status, T0 + 100)
    assert replan_due(spec, status, T0 + 299.5)  # a 10 s timer tick that lands just short still counts


def test_record_plan_and_status_round_trip() -> None:
    status = record_plan(ReplanStatus(last_result="Replanned"), "abc-analytic")
    wire = json.loads(json.dumps({"replan": status.model_dump(mode="json", by_alias=True)}))
    assert ReplanStatus.from_cr_status(wire) == status
    assert ReplanStatus.from_cr_status({"replan": {"drift": {"streak": -1}}}) == ReplanStatus()  # unreadable


def test_telemetry_is_configured_from_the_spec() -> None:
    telemetry = telemetry_for(make_spec(windowSeconds=120), "llm", "prod", default_url="http://fallback:9090")
    assert telemetry.url == "http://prom:9090" and telemetry.window_s == 120
    assert telemetry.matchers == {"app_kubernetes_io_instance": "llm", "namespace": "prod"}
    assert telemetry_for(make_spec(prometheusUrl=None), "llm", "prod", "http://fallback:9090").url == (
        "http://fallback:9090")
    with pytest.raises(TelemetryConfigError, match="--prometheus-url"):
        telemetry_for(make_spec(prometheusUrl=None), "llm", "prod")


def test_an_observed_bucket_past_the_context_is_cut_to_what_the_runtime_serves():
    from disagg_operator.telemetry.replan import served_workload
    from disagg_planner.api import DisaggServingSpec, LengthHistogram, WorkloadSpec

    spec = DisaggServingSpec.model_validate({
        "model": {"preset": "tiny-llama"}, "cluster": {"nodes": 1, "gpusPerNode": 8, "gpuType": "CPU"},
        "workload": {"rate": 1.0}, "slo": {"ttftMs": 1000, "tpotMs": 100}})
    observed = WorkloadSpec(rate=4.0, dataset=None,
                            input_lengths=LengthHistogram(edges=[1, 128, 256, 512, 1024], counts=[0, 3, 40, 0]),
                            output_lengths=LengthHistogram(edges=[2, 4, 8], counts=[5, 38]))
    served = served_workload(observed, spec)
    assert served.input_lengths.max_served == 512 - 2
    assert sum(served.input_lengths.counts) == 43
    spec.model_copy(update={"workload": served})._lengths_within_context()  # the spec's own check accepts it
    with pytest.raises(ValueError, match="beyond the 512-token context"):
        spec.model_copy(update={"workload": observed})._lengths_within_context()
