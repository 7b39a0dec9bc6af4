"""Operator metrics follow the DisaggServing status: the plan in force, its GPUs and goodput, re-plans."""

from __future__ import annotations

from disagg_operator import reporting
from disagg_operator.metrics import OperatorMetrics
from disagg_operator.reconcile import Outcome
from disagg_operator.status import DisaggServingStatus
from operator_plans import colocated_plan, high_plan, spec

KEY = {"namespace": "team", "disaggserving": "chat"}


def _body(plan, plan_hash: str, replanned: str | None = None) -> dict:
    outcome = Outcome(spec=spec(), plan=plan, plan_hash=plan_hash, plan_cached=False, plan_changed=True,
                      paused=False, children=(), applied=(), pruned=(), ready=True)
    status = reporting.to_patch(reporting.success_status(DisaggServingStatus(), outcome, generation=1))
    if replanned:
        status["replan"] = {"replannedTime": replanned}
    return {"metadata": {"namespace": "team", "name": "chat"}, "spec": spec().to_wire(), "status": status}


def _info(m: OperatorMetrics) -> list[dict]:
    return [s.labels for f in m.registry.collect() if f.name == "disagg_operator_plan_info" for s in f.samples]


def test_plan_in_force_replaces_the_previous_one():
    m = OperatorMetrics()
    m.observe(_body(high_plan(), "h1"))
    assert [i["plan_hash"] for i in _info(m)] == ["h1"] and _info(m)[0]["prefill"] == "3x tp2pp1"
    assert m.registry.get_sample_value("disagg_operator_plan_gpus", KEY) == high_plan().gpus
    assert m.registry.get_sample_value("disagg_operator_plan_goodput_rps", KEY) == high_plan().goodput_rps
    assert m.registry.get_sample_value("disagg_operator_slo_attainment_target", KEY) == spec().slo.attainment
    m.observe(_body(colocated_plan(), "h2"))
    assert [(i["plan_hash"], i["mode"]) for i in _info(m)] == [("h2", "colocated")]


def test_replans_count_changes_of_the_replan_time():
    m = OperatorMetrics()
    m.observe(_body(high_plan(), "h1"))
    assert m.registry.get_sample_value("disagg_operator_replans_total", KEY) == 0
    m.observe(_body(high_plan(), "h1", "2026-01-01T00:00:00Z"))
    m.observe(_body(high_plan(), "h1", "2026-01-01T00:00:00Z"))  # a later event, same re-plan
    assert m.registry.get_sample_value("disagg_operator_replans_total", KEY) == 0, "seen at start: not counted"
    m.observe(_body(colocated_plan(), "h2", "2026-01-01T01:00:00Z"))
    assert m.registry.get_sample_value("disagg_operator_replans_total", KEY) == 1
    assert m.registry.get_sample_value("disagg_operator_last_replan_timestamp_seconds", KEY) == 1767229200.0


def test_forget_drops_every_series():
    m = OperatorMetrics()
    m.observe(_body(high_plan(), "h1", "2026-01-01T00:00:00Z"))
    m.forget("team", "chat")
    assert _info(m) == []
    assert m.registry.get_sample_value("disagg_operator_plan_gpus", KEY) is None
    assert m.registry.get_sample_value("disagg_operator_replans_total", KEY) is None


def test_operator_metrics_are_documented_with_their_types():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    section = doc.split("\n## Operator metrics", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `(disagg_operator_[a-z0-9_]+)` \| (\w+) \|", section, re.M))
    exported = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in OperatorMetrics().registry.collect()}
    assert documented == exported
