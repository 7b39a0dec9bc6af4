"""Drift detection: has the workload moved away from the one the current plan was made for?

A reading drifts when the arrival rate, or the mean prompt or output length, is further than its
threshold (relative) from the plan's. A re-plan needs `stable_intervals` consecutive drifted readings
that also agree with each other: each must lie within the thresholds of the first reading of the
streak (its anchor). Noise that swings around the plan (+30 %, -30 %, +30 %) keeps restarting the
streak and never re-plans; a workload that settles at a new level does. A reading on too few requests
decides nothing and leaves the streak as it was.

Lengths are compared at the resolution Prometheus measured them: the plan's histograms are re-binned
onto the runtime's bucket grid first, so a workload that matches the plan reads as no change however
coarse the buckets are.

Everything here is pure and deterministic; the state is a small dataclass that round-trips through
the resource's status (`DriftState.to_wire` / `from_wire`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from disagg_planner.api import LengthHistogram, ReplanSpec, WorkloadSpec
from disagg_planner.workloads import length_histograms

from .buckets import rebin
from .observation import WorkloadObservation
from .status import DriftStatus, ReadingStatus

DEFAULT_MIN_REQUESTS = 50.0
DecisionKind = Literal["insufficient", "steady", "drifting", "confirmed"]


@dataclass(frozen=True)
class Reading:
    """A workload reduced to what drift compares: rate and mean lengths (None: unknown)."""

    rate: float
    input_mean: float | None = None
    output_mean: float | None = None

    def to_wire(self) -> ReadingStatus:
        return ReadingStatus(rate_rps=self.rate, input_mean=self.input_mean, output_mean=self.output_mean)

    @classmethod
    def from_wire(cls, wire: ReadingStatus) -> Reading:
        return cls(wire.rate_rps, wire.input_mean, wire.output_mean)


@dataclass(frozen=True)
class DriftState:
    """Hysteresis state kept between readings (in the resource's status)."""

    streak: int = 0
    anchor: Reading | None = None

    def to_wire(self) -> dict[str, Any]:
        return self.to_status().to_wire()

    def to_status(self) -> DriftStatus:
        return DriftStatus(streak=self.streak, anchor=self.anchor.to_wire() if self.anchor else None)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any] | DriftStatus | None) -> DriftState:
        if wire is None:
            return cls()
        status = wire if isinstance(wire, DriftStatus) else DriftStatus.model_validate(wire)
        return cls(status.streak, Reading.from_wire(status.anchor) if status.anchor else None)


@dataclass(frozen=True)
class Change:
    """One compared quantity: observed vs reference, and whether it moved past its threshold."""

    what: str
    observed: float
    reference: float
    threshold: float
    unit: str

    @property
    def relative(self) -> float:
        return (self.observed - self.reference) / self.reference

    @property
    def drifted(self) -> bool:
        return abs(self.relative) > self.threshold

    def describe(self) -> str:
        return (f"{self.what} {self.observed:.4g} {self.unit} vs planned {self.reference:.4g} "
                f"({self.relative:+.0%}, threshold ±{self.threshold:.0%})")


@dataclass(frozen=True)
class DriftDecision:
    """What one reading decided. `workload` (the observed one, to plan for) is set when confirmed."""

    kind: DecisionKind
    reason: str
    state: DriftState
    reading: Reading | None = None
    planned: Reading | None = None
    changes: tuple[Change, ...] = ()
    workload: WorkloadSpec | None = None

    @property
    def replan(self) -> bool:
        return self.kind == "confirmed"


@dataclass(frozen=True)
class DriftDetector:
    """Thresholds and hysteresis of drift; `step` is a pure function of (state, plan, observation)."""

    rate_change: float = 0.2
    length_change: float = 0.2
    stable_intervals: int = 2
    min_requests: float = DEFAULT_MIN_REQUESTS
    step_change: float | None = None  # a change beyond this confirms on one reading

    def __post_init__(self) -> None:
        if self.rate_change <= 0 or self.length_change <= 0:
            raise ValueError("drift thresholds must be positive")
        if self.stable_intervals < 1:
            raise ValueError(f"stable_intervals must be at least 1, got {self.stable_intervals}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, got {self.min_requests}")

    @classmethod
    def from_spec(cls, replan: ReplanSpec, min_requests: float | None = None) -> DriftDetector:
        return cls(rate_change=replan.rate_change, length_change=replan.length_change,
                   stable_intervals=replan.stable_intervals,
                   min_requests=replan.min_requests if min_requests is None else min_requests,
                   step_change=replan.step_change)

    def step(self, state: DriftState, planned: WorkloadSpec, obs: WorkloadObservation) -> DriftDecision:
        """Fold one observation into the state; decide whether the plan's workload is still current."""
        if not obs.series_found:
            reason = obs.notes[-1] if obs.notes else "no series found for this resource"
            return DriftDecision("insufficient", reason, state)
        if obs.requests < self.min_requests:
            reason = (f"only {obs.requests:.0f} requests in the last {obs.covered_s:.0f} s (need "
                      f"{self.min_requests:.0f} to judge drift)")
            return DriftDecision("insufficient", reason, state)

        reading = _reading(obs)
        reference = self.planned_reading(planned, obs)
        changes = self._changes(reading, reference)
        drifted = [c for c in changes if c.drifted]
        summary = "; ".join(c.describe() for c in changes)
        if not drifted:
            return DriftDecision("steady", f"within thresholds: {summary}", DriftState(), reading, reference, changes)

        continues = state.anchor is not None and state.streak > 0 and self._agrees(reading, state.anchor)
        streak = state.streak + 1 if continues else 1
        anchor = state.anchor if continues and state.anchor is not None else reading
        moved = "; ".join(c.describe() for c in drifted)
        step = self.step_change is not None and any(abs(c.relative) > self.step_change for c in drifted)
        if step and streak < self.stable_intervals:
            reason = f"workload stepped past ±{self.step_change:.0%} in one reading: {moved}"
            return DriftDecision("confirmed", reason, DriftState(), reading, reference, changes,
                                 workload=obs.to_workload(planned))
        if streak < self.stable_intervals:
            reason = f"drifting ({streak} of {self.stable_intervals} readings): {moved}"
            return DriftDecision("drifting", reason, DriftState(streak, anchor), reading, reference, changes)
        held = f" for {streak} consecutive readings" if streak > 1 else ""
        reason = f"workload drifted{held}: {moved}"
        return DriftDecision("confirmed", reason, DriftState(), reading, reference, changes,
                             workload=obs.to_workload(planned))

    def planned_reading(self, planned: WorkloadSpec, obs: WorkloadObservation) -> Reading:
        """The plan's workload seen through the observation's buckets."""
        inputs, outputs = length_histograms(planned)
        return Reading(planned.rate, _mean_on(inputs, obs.input_lengths), _mean_on(outputs, obs.output_lengths))

    def _changes(self, new: Reading, ref: Reading) -> tuple[Change, ...]:
        out = [Change("arrival rate", new.rate, ref.rate, self.rate_change, "req/s")]
        for what, a, b in (("mean prompt length", new.input_mean, ref.input_mean),
                           ("mean output length", new.output_mean, ref.output_mean)):
            if a is not None and b is not None and b > 0:
                out.append(Change(what, a, b, self.length_change, "tokens"))
        return tuple(out)

    def _agrees(self, reading: Reading, anchor: Reading) -> bool:
        """Whether `reading` is the same workload as the streak's anchor (within the thresholds)."""
        if anchor.rate <= 0:
            return False
        return not any(c.drifted for c in self._changes(reading, anchor))


def _reading(obs: WorkloadObservation) -> Reading:
    return Reading(obs.rate_rps, obs.input_mean, obs.output_mean)


def _mean_on(planned: LengthHistogram, observed: LengthHistogram | None) -> float | None:
    return rebin(planned, observed.edges).mean if observed is not None else None
