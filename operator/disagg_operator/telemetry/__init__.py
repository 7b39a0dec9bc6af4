"""Workload telemetry and drift-driven re-planning.

Prometheus (router metrics) -> `WorkloadObservation` -> `DriftDetector` (with hysteresis, state in
`status.replan`) -> `replan_tick` decides -> the operator re-plans for `effective_spec` and rolls out.

`loop.ReplanLoop` (the operator-wide task that runs the checks) and `events.KubeEventPoster` import the
reconciler; they are not re-exported here so that `reconcile.py` can import `effective_spec` from this
package without an import cycle.
"""

from .buckets import BucketHistogram, from_buckets, rebin, trimmed
from .drift import Change, DriftDecision, DriftDetector, DriftState, Reading
from .errors import PrometheusUnavailable, TelemetryConfigError, TelemetryError, TelemetryQueryError
from .names import MetricNames, ScrapeLabels
from .observation import WorkloadObservation
from .prometheus import PrometheusTelemetry, PromQueries
from .replan import (
    ReplanDecision,
    ReplanEvent,
    WorkloadSource,
    effective_spec,
    record_plan,
    replan_due,
    replan_tick,
    telemetry_for,
    workload_hash,
)
from .status import DriftStatus, ObservationStatus, ReadingStatus, ReplanStatus

__all__ = [
    "BucketHistogram", "Change", "DriftDecision", "DriftDetector", "DriftState", "DriftStatus", "MetricNames",
    "ObservationStatus", "PromQueries", "PrometheusTelemetry", "PrometheusUnavailable", "Reading",
    "ReadingStatus", "ReplanDecision", "ReplanEvent", "ReplanStatus", "ScrapeLabels", "TelemetryConfigError",
    "TelemetryError", "TelemetryQueryError", "WorkloadObservation", "WorkloadSource", "effective_spec",
    "from_buckets", "rebin", "record_plan", "replan_due", "replan_tick", "telemetry_for", "trimmed",
    "workload_hash",
]
