"""One re-planning check of a DisaggServing, as the operator's re-planning loop (`loop.py`) runs it.

`replan_tick` reads the workload, folds it into the drift state kept in `status.replan`, and says
what to do: nothing, or plan again for the observed workload. It never touches Kubernetes: the caller
writes `ReplanDecision.status_patch()`, posts `ReplanDecision.event`, and on `replan` reconciles with
`effective_spec`, which swaps in the observed workload. The CR's spec is never rewritten; a user who
edits `spec.workload` voids the observed one (their edit wins), and so does disabling re-planning.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time as wallclock
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from disagg_planner.api import DisaggServingSpec, LengthHistogram, WorkloadSpec
from disagg_planner.workloads import length_histograms

from .drift import DriftDecision, DriftDetector, DriftState, Reading
from .errors import TelemetryError
from .names import MetricNames, ScrapeLabels
from .observation import WorkloadObservation
from .prometheus import PrometheusTelemetry
from .status import CheckResult, DriftStatus, ObservationStatus, ReplanStatus

_RESULT: dict[str, CheckResult] = {"insufficient": "Insufficient", "steady": "Steady", "drifting": "Drifting",
                                   "confirmed": "Replanned"}


class WorkloadSource(Protocol):
    """Anything that observes a resource's workload (`PrometheusTelemetry`, or a recorded trace)."""

    async def observe(self, at: float | None = None) -> WorkloadObservation: ...


@dataclass(frozen=True)
class ReplanEvent:
    """A Kubernetes Event to post on the DisaggServing."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class ReplanDecision:
    """The outcome of one check. `workload` is set exactly when a re-plan is due."""

    result: CheckResult
    status: ReplanStatus
    previous: ReplanStatus
    workload: WorkloadSpec | None = None
    event: ReplanEvent | None = None
    drift: DriftDecision | None = None
    observation: WorkloadObservation | None = None

    @property
    def replan(self) -> bool:
        return self.workload is not None

    @property
    def changed(self) -> bool:
        """Whether `status.replan` needs writing."""
        return self.status != self.previous

    def status_patch(self) -> dict[str, Any]:
        """`{"replan": ...}` for a merge patch of the status; None values clear stale keys."""
        return {"replan": self.status.model_dump(mode="json", by_alias=True)}


def workload_hash(workload: WorkloadSpec) -> str:
    return hashlib.sha256(workload.model_dump_json().encode()).hexdigest()[:16]


def effective_spec(spec: DisaggServingSpec, cr_status: Mapping[str, Any] | None) -> DisaggServingSpec:
    """The spec to plan for: `spec` with the observed workload of the last drift re-plan, if still valid."""
    observed = _valid_override(spec, ReplanStatus.from_cr_status(cr_status))
    return spec if observed is None else spec.model_copy(update={"workload": observed})


def record_plan(status: ReplanStatus, plan_hash: str) -> ReplanStatus:
    """`status` with the planning hash of the plan a re-plan caused (after the reconcile that made it)."""
    return status.model_copy(update={"replan_plan_hash": plan_hash})


def replan_due(spec: DisaggServingSpec, cr_status: Mapping[str, Any] | None, now: float | None = None) -> bool:
    """Whether `spec.replan.intervalSeconds` has passed since the last check (kopf timers tick faster)."""
    last = ReplanStatus.from_cr_status(cr_status).last_check_time
    if last is None:
        return True
    now = wallclock.time() if now is None else now
    # One second of slack: a timer ticking every N s must not miss an interval that is a multiple of N.
    return now - parse_rfc3339(last) >= spec.replan.interval_seconds - 1.0


def telemetry_for(spec: DisaggServingSpec, name: str, namespace: str, default_url: str | None = None, *,
                  names: MetricNames | None = None, labels: ScrapeLabels | None = None) -> PrometheusTelemetry:
    """Telemetry of one resource: its own Prometheus URL, else the operator's default."""
    return PrometheusTelemetry(url=spec.replan.prometheus_url or default_url or "",
                               window_s=float(spec.replan.window_seconds), instance=name, namespace=namespace,
                               names=names or MetricNames(), labels=labels or ScrapeLabels())


async def replan_tick(spec: DisaggServingSpec, status: Mapping[str, Any] | None, telemetry: WorkloadSource,
                      detector: DriftDetector | None = None, *, now: float | None = None) -> ReplanDecision:
    """One check: observe, update the drift state, and decide whether to re-plan.

    `status` is the resource's whole status (the check reads `status.replan`); `detector` defaults to
    the thresholds of `spec.replan`. Telemetry failures are reported in the decision, never raised.
    """
    now = wallclock.time() if now is None else now
    stamp = rfc3339(now)
    previous = ReplanStatus.from_cr_status(status)
    if not spec.replan.enabled:
        cleared = ReplanStatus(last_result="Disabled", message="spec.replan.enabled is false")
        keep = previous if previous.last_result == "Disabled" else cleared
        return ReplanDecision("Disabled", keep, previous)

    current = previous
    voided = previous.observed_workload is not None and _valid_override(spec, previous) is None
    if voided:
        current = previous.model_copy(update={"observed_workload": None, "spec_workload_hash": None,
                                              "replan_plan_hash": None, "drift": DriftStatus()})
    planned_for = current.observed_workload or spec.workload
    detector = detector or DriftDetector.from_spec(spec.replan)

    try:
        obs = await telemetry.observe(at=now)
    except TelemetryError as exc:
        message = str(exc)
        update = {"last_check_time": stamp, "last_result": "Unavailable", "message": message[:4096]}
        event = None
        if previous.last_result != "Unavailable":  # one Event when it breaks, not one per interval
            event = ReplanEvent("Warning", "TelemetryUnavailable", message[:1024])
        return ReplanDecision("Unavailable", current.model_copy(update=update), previous, event=event)

    drift = detector.step(DriftState.from_wire(current.drift), planned_for, obs)
    result = _RESULT[drift.kind]
    message = drift.reason
    if voided:
        message = f"spec.workload changed since the last re-plan, so it is the reference again; {message}"
    update: dict[str, Any] = {
        "last_check_time": stamp, "last_result": result, "message": message[:4096],
        "drift": drift.state.to_status(), "last_observation": _observation_status(obs),
    }
    if drift.workload is None:  # set exactly when drift is confirmed
        return ReplanDecision(result, current.model_copy(update=update), previous, drift=drift, observation=obs)

    observed = served_workload(drift.workload, spec)
    update |= {"observed_workload": observed, "spec_workload_hash": workload_hash(spec.workload),
               "replanned_time": stamp, "replan_reason": drift.reason[:4096], "replan_plan_hash": None}
    event = ReplanEvent("Normal", "WorkloadDrift", f"{drift.reason}; re-planning for {_describe(observed)}"
                        [:1024])
    return ReplanDecision(result, current.model_copy(update=update), previous, workload=observed,
                          event=event, drift=drift, observation=obs)


def served_workload(workload: WorkloadSpec, spec: DisaggServingSpec) -> WorkloadSpec:
    """`workload` with its prompt histogram cut at the longest prompt the runtime serves.

    Observed lengths come from Prometheus buckets, whose last edge can lie past the context (a 256-512 bucket
    for a 512-token model) although every request counted in it was served: without the cut the observed
    workload would fail the spec's own context check and the re-plan with it.
    """
    inputs, outputs = workload.input_lengths, workload.output_lengths
    if inputs is None or outputs is None:
        return workload
    cap = spec.model.spec.max_context - outputs.min_served
    if spec.runtime.max_prompt_tokens is not None:
        cap = min(cap, spec.runtime.max_prompt_tokens)
    if cap < 1 or inputs.max_served <= cap:
        return workload
    edges, counts = [], []
    for low, count in zip(inputs.edges, inputs.counts, strict=False):
        if low > cap and counts:
            counts[-1] += count  # served, so within the cap: the bucket was only wider than the context
            continue
        edges.append(min(low, cap))
        counts.append(count)
    edges.append(edges[-1] + 1 if edges[-1] >= cap else cap + 1)
    clipped = LengthHistogram(edges=edges, counts=counts)
    return workload.model_copy(update={"input_lengths": clipped})


def _valid_override(spec: DisaggServingSpec, status: ReplanStatus) -> WorkloadSpec | None:
    if not spec.replan.enabled or status.observed_workload is None:
        return None
    if status.spec_workload_hash != workload_hash(spec.workload):
        return None
    return status.observed_workload


def _observation_status(obs: WorkloadObservation) -> ObservationStatus:
    reading = Reading(obs.rate_rps, obs.input_mean, obs.output_mean).to_wire()
    return ObservationStatus(time=rfc3339(obs.time), window_seconds=obs.window_s, covered_seconds=obs.covered_s,
                             requests=obs.requests, reading=reading)


def _describe(workload: WorkloadSpec) -> str:
    inputs, outputs = length_histograms(workload)
    return (f"{workload.rate:.4g} req/s, mean prompt {inputs.mean:.4g} tokens, "
            f"mean output {outputs.mean:.4g} tokens")


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
