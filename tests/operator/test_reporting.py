"""Status reporting: conditions follow Kubernetes conventions; failures keep the last good plan."""

from __future__ import annotations

from disagg_operator import reporting
from disagg_operator.reconcile import Outcome
from disagg_operator.status import DisaggServingStatus, set_condition
from disagg_planner.api import GoodputInterval
from operator_plans import colocated_plan, high_plan, spec


def _outcome(plan=None, *, paused=False, ready=False) -> Outcome:
    return Outcome(spec=spec(), plan=plan or high_plan(), plan_hash="h1", plan_cached=False, plan_changed=True,
                   paused=paused, children=("ConfigMap/chat-plan", "StatefulSet/chat-prefill"), applied=(),
                   pruned=(), ready=ready)


def _conds(status: DisaggServingStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_transition_time_moves_only_when_status_flips():
    conds = set_condition([], "Ready", "False", "ReplicasNotReady", now="2026-01-01T00:00:00Z")
    same = set_condition(conds, "Ready", "False", "StillWaiting", "new message", now="2026-01-02T00:00:00Z")
    assert same[0].last_transition_time == "2026-01-01T00:00:00Z" and same[0].message == "new message"
    flipped = set_condition(same, "Ready", "True", "AllReplicasReady", now="2026-01-03T00:00:00Z")
    assert flipped[0].last_transition_time == "2026-01-03T00:00:00Z" and len(flipped) == 1


def test_success_reports_plan_shapes_goodput_and_conditions():
    status = reporting.success_status(DisaggServingStatus(), _outcome(), generation=3)
    assert status.phase == "Progressing" and status.observed_generation == 3 and status.plan_hash == "h1"
    assert status.prefill_shape == "3x tp2pp1" and status.decode_shape == "1x tp2pp2"
    assert status.goodput_rps == 5.0 and status.gain_over_colocated == 2.1 and status.gpus == 10
    assert _conds(status) == {"Planned": ("True", "PlanFound"), "Degraded": ("False", "AsExpected"),
                              "Progressing": ("True", "ChildrenApplied"), "Ready": ("False", "ReplicasNotReady")}
    planned = status.condition("Planned")
    assert "prefill 3x tp2pp1" in planned.message and "2.10x colocated" in planned.message


def test_the_goodput_interval_is_in_the_status():
    plan = high_plan().model_copy(update={"goodput_interval": GoodputInterval(
        low_rps=4.6, high_rps=5.3, coverage=0.9, seeds=[0, 1, 2, 3, 4], samples_rps=[5.0, 4.9, 5.1, 5.0, 4.8])})
    status = reporting.success_status(DisaggServingStatus(), _outcome(plan), generation=1)
    assert status.goodput_interval == "4.6-5.3 req/s (90%, 5 seeds)"
    assert "90% interval 4.6-5.3 over 5 seeds" in status.condition("Planned").message
    assert reporting.to_patch(status)["goodputInterval"] == status.goodput_interval
    without = reporting.success_status(DisaggServingStatus(), _outcome(), generation=1)
    assert without.goodput_interval is None and "interval" not in without.condition("Planned").message


def test_ready_and_paused_phases():
    ready = reporting.success_status(DisaggServingStatus(), _outcome(ready=True), generation=1)
    assert ready.phase == "Ready" and _conds(ready)["Ready"] == ("True", "AllReplicasReady")
    paused = reporting.success_status(DisaggServingStatus(), _outcome(paused=True), generation=1)
    assert paused.phase == "Paused" and _conds(paused)["Progressing"] == ("False", "Paused")


def test_colocated_plan_shapes():
    status = reporting.success_status(DisaggServingStatus(), _outcome(colocated_plan()), generation=1)
    assert status.prefill_shape == status.decode_shape == "4x tp1pp1 (colocated)"


def test_failure_keeps_last_good_plan_and_marks_degraded():
    good = reporting.success_status(DisaggServingStatus(), _outcome(), generation=1)
    bad = reporting.failure_status(good, reporting.INVALID_SPEC, "spec.slo.ttftMs: must be > 0", 2, planned=False)
    assert bad.phase == "Degraded" and bad.observed_generation == 2
    assert bad.plan == good.plan and bad.plan_hash == "h1"
    assert _conds(bad)["Degraded"] == ("True", "InvalidSpec") and _conds(bad)["Planned"] == ("False", "InvalidSpec")
    api = reporting.failure_status(good, reporting.APPLY_FAILED, "503", 1, planned=True)
    assert _conds(api)["Planned"] == ("True", "PlanFound")


def test_patch_clears_unset_fields_and_previous_status_tolerates_foreign_keys():
    patch = reporting.to_patch(DisaggServingStatus(phase="Degraded"))
    assert patch["plan"] is None and patch["phase"] == "Degraded"  # null deletes in a merge patch
    prev = reporting.previous_status({"status": {"phase": "Ready", "kopf": {"progress": {}}, "planHash": "h"}})
    assert prev.phase == "Ready" and prev.plan_hash == "h"
    assert reporting.previous_status({"status": {"phase": "Exploded"}}) == DisaggServingStatus()


def test_deprecated_bandwidth_fields_are_reported_in_status_warnings():
    from disagg_operator.reconcile import parse_spec
    from disagg_operator.telemetry.replan import effective_spec

    raw = spec().to_wire()
    raw["cluster"] = {k: v for k, v in raw["cluster"].items() if not k.endswith("Bandwidth")} | {"interNodeGbps": 25}
    old = effective_spec(parse_spec(raw), {})
    outcome = Outcome(**{**_outcome().__dict__, "spec": old})
    status = reporting.success_status(DisaggServingStatus(), outcome, generation=1)
    assert len(status.warnings) == 1 and "interNodeGbps is deprecated" in status.warnings[0]
    assert reporting.to_patch(status)["warnings"] == status.warnings
    assert reporting.success_status(DisaggServingStatus(), _outcome(), generation=1).warnings == []
