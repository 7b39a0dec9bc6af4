"""What re-planning keeps in the DisaggServing status (`status.replan`), so an operator restart resumes it.

These are the wire types (pydantic, camelCase, part of the CRD's status schema); the detector works on
the dataclasses in `drift.py` and converts at this boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from disagg_planner.api import ApiModel, WorkloadSpec
from pydantic import Field, ValidationError

CheckResult = Literal["Disabled", "Unavailable", "Insufficient", "Steady", "Drifting", "Replanned"]


class ReadingStatus(ApiModel):
    """One workload summary: rate and mean lengths (None where no request completed)."""

    rate_rps: float = Field(ge=0)
    input_mean: float | None = Field(default=None, ge=0)
    output_mean: float | None = Field(default=None, ge=0)


class DriftStatus(ApiModel):
    """Hysteresis state: how many consecutive readings drifted, and where the streak started."""

    streak: int = Field(default=0, ge=0)
    anchor: ReadingStatus | None = Field(default=None, description="First drifted reading of the streak.")


class ObservationStatus(ApiModel):
    """The last reading telemetry made."""

    time: str = Field(description="RFC 3339 time the window ended.")
    window_seconds: float = Field(ge=0)
    covered_seconds: float = Field(ge=0, description="Part of the window with data.")
    requests: float = Field(ge=0)
    reading: ReadingStatus


class ReplanStatus(ApiModel):
    """Re-planning state of one DisaggServing."""

    last_check_time: str | None = Field(default=None, description="RFC 3339 time of the last telemetry check.")
    last_result: CheckResult | None = None
    message: str = Field(default="", max_length=4096, description="Why the last check decided what it did.")
    drift: DriftStatus = Field(default_factory=DriftStatus)
    last_observation: ObservationStatus | None = None
    observed_workload: WorkloadSpec | None = Field(
        default=None, description="The observed workload the current plan is made for; unset: spec.workload.")
    spec_workload_hash: str | None = Field(
        default=None, description="Hash of spec.workload when observedWorkload was recorded; an edited "
        "spec.workload voids observedWorkload.")
    replanned_time: str | None = Field(default=None, description="RFC 3339 time of the last drift re-plan.")
    replan_reason: str | None = Field(default=None, max_length=4096)
    replan_plan_hash: str | None = Field(default=None, description="Planning hash of the plan the re-plan caused.")

    @classmethod
    def from_cr_status(cls, status: Mapping[str, Any] | None) -> ReplanStatus:
        """`status.replan` of a resource; a missing or unreadable one (older operator) starts afresh."""
        raw = (status or {}).get("replan")
        if not raw:
            return cls()
        try:
            return cls.model_validate(raw)
        except ValidationError:
            return cls()
