"""What telemetry saw of one DisaggServing's traffic over a look-back window."""

from __future__ import annotations

from dataclasses import dataclass

from disagg_planner.api import LengthHistogram, WorkloadSpec

from .buckets import trimmed


@dataclass(frozen=True)
class WorkloadObservation:
    """Arrival rate and length histograms over `[time - covered_s, time]`.

    `covered_s` is the part of the window in which the router's series existed: a deployment younger
    than the window is measured over its own age, so its rate is not diluted by the time before it ran.
    Histograms hold the lengths of completed requests on the runtime's bucket grid (empty bins kept, so
    the drift detector can compare at one resolution); None when no request completed in the window.
    """

    time: float  # unix seconds the queries were evaluated at
    window_s: float
    covered_s: float
    requests: float  # arrivals in the window (extrapolated by Prometheus, hence fractional)
    rate_rps: float
    input_lengths: LengthHistogram | None
    output_lengths: LengthHistogram | None
    input_overflow: float = 0.0
    output_overflow: float = 0.0
    series_found: bool = True  # False: no series matched, i.e. nothing is scraped for this resource
    notes: tuple[str, ...] = ()

    @property
    def input_mean(self) -> float | None:
        return self.input_lengths.mean if self.input_lengths is not None else None

    @property
    def output_mean(self) -> float | None:
        return self.output_lengths.mean if self.output_lengths is not None else None

    def to_workload(self, fallback: WorkloadSpec) -> WorkloadSpec:
        """The observed workload as a spec to plan for: observed rate, observed lengths.

        Where no request completed (no histograms), the lengths of `fallback` are kept.
        """
        if self.rate_rps <= 0:
            raise ValueError("an observation with no arrivals is not a workload to plan for")
        if self.input_lengths is None or self.output_lengths is None:
            return fallback.model_copy(update={"rate": self.rate_rps})
        return WorkloadSpec(rate=self.rate_rps, dataset=None, input_lengths=trimmed(self.input_lengths),
                            output_lengths=trimmed(self.output_lengths))
