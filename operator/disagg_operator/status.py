"""The DisaggServing status: the plan, its prediction, and Kubernetes-style conditions.

Conditions follow the API conventions (metav1.Condition): one entry per type, `lastTransitionTime`
moves only when `status` flips, so `kubectl wait --for=condition=Ready` and Argo CD health checks
see stable timestamps across re-reconciles.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from disagg_planner.api import ApiModel, PhasePlan, Plan
from pydantic import Field

from .telemetry.status import ReplanStatus

ConditionType = Literal["Planned", "Ready", "Progressing", "Degraded"]
ConditionStatus = Literal["True", "False", "Unknown"]
Phase = Literal["Pending", "Paused", "Progressing", "Ready", "Degraded"]


class Condition(ApiModel):
    """One observation about the resource (Kubernetes metav1.Condition)."""

    type: ConditionType
    status: ConditionStatus
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(description="RFC 3339 time the status last changed.")
    observed_generation: int | None = Field(default=None, ge=0)


class DisaggServingStatus(ApiModel):
    """What the operator decided and observed for one DisaggServing."""

    phase: Phase = "Pending"
    observed_generation: int | None = Field(default=None, ge=0)
    plan_hash: str | None = Field(default=None, description="Planning hash of the spec the plan was made for.")
    plan: Plan | None = None
    prefill_shape: str | None = Field(default=None, description="e.g. `2x tp2pp1`.")
    decode_shape: str | None = None
    goodput_rps: float | None = Field(default=None, ge=0, description="Predicted goodput of the whole plan.")
    goodput_interval: str | None = Field(
        default=None, description="e.g. `26.1-30.4 req/s (90%, 5 seeds)`: where a fresh trace's goodput falls.")
    per_gpu_goodput: float | None = Field(default=None, ge=0)
    gain_over_colocated: float | None = Field(default=None, ge=0)
    gpus: int | None = Field(default=None, ge=0)
    children: list[str] = Field(default_factory=list, description="Kind/name of every applied child.")
    retiring: list[str] = Field(
        default_factory=list, description="Kind/name of children of earlier plans that keep serving until the "
        "plan's workloads are ready, and are deleted then.")
    conditions: list[Condition] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list, description="Deprecated spec fields in use (converted), "
                                "with the field to write instead.")
    replan: ReplanStatus | None = Field(default=None, description="Drift re-planning state (telemetry loop).")

    def condition(self, type_: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[Condition],
    type_: ConditionType,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """A new list with `type_` set; the transition time is kept when the status did not flip."""
    previous = next((c for c in conditions if c.type == type_), None)
    changed = previous is None or previous.status != status
    stamp = (now or now_rfc3339()) if changed else previous.last_transition_time
    updated = Condition(type=type_, status=status, reason=reason, message=message,
                        last_transition_time=stamp, observed_generation=generation)
    return [c for c in conditions if c.type != type_] + [updated]


def shape_of(phase: PhasePlan | None) -> str | None:
    """`2x tp2pp1`: replicas and the per-instance parallelism, as `kubectl get` shows it."""
    if phase is None:
        return None
    return f"{phase.replicas}x tp{phase.tp}pp{phase.pp}"


def _interval(plan: Plan) -> str | None:
    iv = plan.goodput_interval
    if iv is None:
        return None
    return f"{iv.low_rps:.3g}-{iv.high_rps:.3g} req/s ({iv.coverage:.0%}, {len(iv.seeds)} seeds)"


def plan_summary(plan: Plan) -> dict[str, object]:
    """The status fields derived from a plan (shapes, goodput, gain)."""
    if plan.mode == "colocated":
        prefill = decode = f"{shape_of(plan.colocated)} (colocated)"
    else:
        prefill, decode = shape_of(plan.prefill), shape_of(plan.decode)
    return {
        "plan": plan, "prefill_shape": prefill, "decode_shape": decode, "goodput_rps": plan.goodput_rps,
        "goodput_interval": _interval(plan),
        "per_gpu_goodput": plan.per_gpu_goodput, "gain_over_colocated": plan.gain_over_colocated,
        "gpus": plan.gpus,
    }
