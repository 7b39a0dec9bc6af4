"""Status and event text for reconcile outcomes and failures.

Pure functions from (previous status, what happened) to the next status; the kopf layer writes
the result as a merge patch. Every field is written (None clears it), so a status never mixes
a fresh phase with a stale plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from disagg_planner.api import Plan

from .reconcile import Outcome
from .status import DisaggServingStatus, Phase, plan_summary, set_condition

# Condition reasons (CamelCase, as Kubernetes tools expect).
INVALID_SPEC = "InvalidSpec"
NO_FEASIBLE_PLAN = "NoFeasiblePlan"
PLANNING_FAILED = "PlanningFailed"
RENDER_FAILED = "RenderFailed"
APPLY_FAILED = "ApplyFailed"
ROLLING_OUT = "RollingOut"
PLANNING_TIMEOUT = "PlanningTimeout"
TARGET_NOT_MET = "TargetNotMet"
PLANNING = "Planning"


def previous_status(body: Mapping[str, Any]) -> DisaggServingStatus:
    """The stored status, tolerating fields other writers (or older operators) left behind."""
    stored = body.get("status")
    raw = dict(stored) if isinstance(stored, Mapping) else {}
    known = {f.alias or name for name, f in DisaggServingStatus.model_fields.items()} | set(
        DisaggServingStatus.model_fields)
    try:
        return DisaggServingStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValueError:
        return DisaggServingStatus()


def describe_plan(plan: Plan) -> str:
    summary = plan_summary(plan)
    if plan.mode == "colocated":
        how = f"chunked prefill {plan.chunk_token_budget}" if plan.colocated_prefill == "chunked" else "prefill priority"
        shape = f"colocated ({how}) {summary['prefill_shape']}"
    else:
        shape = f"{plan.affinity}-affinity prefill {summary['prefill_shape']}, decode {summary['decode_shape']}"
    gain = f", {plan.gain_over_colocated:.2f}x colocated per GPU" if plan.gain_over_colocated is not None else ""
    choice = f"; mode {plan.choice}" if plan.choice else ""
    iv = plan.goodput_interval
    interval = (f", {iv.coverage:.0%} interval {iv.low_rps:.3g}-{iv.high_rps:.3g} over {len(iv.seeds)} seeds"
                if iv is not None else "")
    return (f"{shape} on {plan.gpus} GPUs; predicted goodput {plan.goodput_rps:.3g} req/s{interval} "
            f"({plan.per_gpu_goodput:.3g} per GPU{gain}) for {plan.target_rate_rps:.3g} req/s target{choice}")


def planning_status(prev: DisaggServingStatus, message: str, generation: int | None) -> DisaggServingStatus:
    """Planned=Unknown while the resource waits for a search (so every resource has a status meanwhile).

    observedGeneration stays: the generation is observed once its outcome is written.
    """
    conds = set_condition(prev.conditions, "Planned", "Unknown", PLANNING, message, generation=generation)
    return prev.model_copy(update={"conditions": conds})


def success_status(prev: DisaggServingStatus, outcome: Outcome, generation: int | None) -> DisaggServingStatus:
    conds = set_condition(prev.conditions, "Planned", "True", "PlanFound", describe_plan(outcome.plan),
                          generation=generation)
    if outcome.shortfall is not None:
        # The budget's best plan is applied, but it is not what was asked for: say so, with the numbers.
        short = outcome.shortfall
        message = short.message()
        conds = set_condition(conds, "TargetNotMet", "True", TARGET_NOT_MET, message, generation=generation)
        conds = set_condition(conds, "Degraded", "True", TARGET_NOT_MET, message, generation=generation)
    else:
        conds = [c for c in conds if c.type != "TargetNotMet"]
        conds = set_condition(conds, "Degraded", "False", "AsExpected", generation=generation)
    phase: Phase
    if outcome.paused:
        phase = "Paused"
        conds = set_condition(conds, "Progressing", "False", "Paused",
                              "spec.paused is true: the plan is reported, nothing is applied", generation=generation)
        conds = set_condition(conds, "Ready", "Unknown", "Paused", generation=generation)
    elif outcome.retiring:
        phase = "Progressing"
        workloads = sum(1 for key in outcome.retiring if key.split("/", 1)[0] in ("StatefulSet", "Deployment"))
        message = (f"rolling out the new plan beside the previous one: {workloads} workloads of the previous plan "
                   f"keep serving until every workload of the new plan is ready")
        conds = set_condition(conds, "Progressing", "True", ROLLING_OUT, message, generation=generation)
        conds = set_condition(conds, "Ready", "False", ROLLING_OUT, message, generation=generation)
    else:
        phase = "Ready" if outcome.ready else "Progressing"
        conds = _rollout_conditions(conds, outcome.ready, len(outcome.children), generation)
    return DisaggServingStatus(phase=phase, observed_generation=generation, plan_hash=outcome.plan_hash,
                               children=list(outcome.children), retiring=list(outcome.retiring), conditions=conds,
                               warnings=outcome.spec.deprecations(), **plan_summary(outcome.plan))


def readiness_status(prev: DisaggServingStatus, ready: bool, generation: int | None) -> DisaggServingStatus:
    """The status after workloads changed readiness (only the rollout conditions and the phase move)."""
    conds = _rollout_conditions(prev.conditions, ready, len(prev.children), generation)
    return prev.model_copy(update={"phase": "Ready" if ready else "Progressing", "conditions": conds})


def _rollout_conditions(conds: list, ready: bool, children: int, generation: int | None) -> list:
    if ready:
        conds = set_condition(conds, "Progressing", "False", "RolloutComplete",
                              f"{children} children applied and ready", generation=generation)
        return set_condition(conds, "Ready", "True", "AllReplicasReady", generation=generation)
    conds = set_condition(conds, "Progressing", "True", "ChildrenApplied",
                          f"{children} children applied; waiting for workloads to become ready", generation=generation)
    return set_condition(conds, "Ready", "False", "ReplicasNotReady", generation=generation)


def failure_status(prev: DisaggServingStatus, reason: str, message: str, generation: int | None, *,
                   planned: bool) -> DisaggServingStatus:
    """Degraded, keeping the last good plan (its children are left running untouched)."""
    conds = set_condition(prev.conditions, "Degraded", "True", reason, message, generation=generation)
    if not planned:
        conds = set_condition(conds, "Planned", "False", reason, message, generation=generation)
    return prev.model_copy(update={"phase": "Degraded", "observed_generation": generation, "conditions": conds})


def to_patch(status: DisaggServingStatus) -> dict[str, Any]:
    """The merge-patch body for `status`: every known field, None where unset (clears stale values).

    `replan` belongs to the re-planning loop: left out unless set, so a reconcile never erases it.
    """
    patch = status.model_dump(mode="json", by_alias=True)
    if patch.get("replan") is None:
        patch.pop("replan", None)
    return patch
