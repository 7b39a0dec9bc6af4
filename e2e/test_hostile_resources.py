"""Hostile DisaggServings against a running operator: searches stopped at the planning deadline without
starving other resources, targets the budget cannot meet reported with their numbers, specs the planner
cannot use refused naming the field, and a mangled status.plan left by another writer."""

from __future__ import annotations

import time

import kubernetes
import pytest
from disagg_operator.crd import GROUP, PLURAL, VERSION

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import small

DEADLINE_S = 6.0  # the normal resource must plan well inside it on a loaded 2-core machine
# Schema-valid and slow to search: every node count x GPU count the planner may place, at a huge rate.
PATHOLOGICAL = small(cluster={"nodes": 4096, "gpusPerNode": 64, "gpuType": "A100-80GB"},
                     workload={"rate": 1e6, "dataset": "chatbot"}, search={"maxTp": 8, "maxPp": 8})


def _condition(kubectl: Kubectl, name: str, type_: str, status: str = "True") -> dict | None:
    cond = kubectl.condition(name, type_)
    return cond if cond and cond["status"] == status else None


def test_pathological_searches_stop_at_the_deadline_and_others_are_still_planned(api, namespace, start_operator):
    kubectl = Kubectl(api, namespace)
    start_operator(plan_threads=2, plan_deadline_s=DEADLINE_S)
    t0 = time.monotonic()
    for name in ("slow-a", "slow-b"):  # enough to take both planning threads
        kubectl.create(name, PATHOLOGICAL)
    kubectl.create("normal", small())
    for name in ("slow-a", "slow-b"):
        degraded = wait_for(lambda n=name: _condition(kubectl, n, "Degraded"), timeout=60, what=f"{name} timed out")
        assert degraded["reason"] == "PlanningTimeout" and f"{DEADLINE_S:g}s deadline" in degraded["message"]
        assert _condition(kubectl, name, "Planned", "False")["reason"] == "PlanningTimeout"
        assert kubectl.children(name) == {}
    try:
        wait_for(lambda: _condition(kubectl, "normal", "Planned") and kubectl.children("normal"), timeout=90,
                 what="the normal resource planned and applied")
    except TimeoutError:
        raise AssertionError(f"normal: {kubectl.status('normal')}") from None
    assert time.monotonic() - t0 < 90


def test_a_target_the_budget_cannot_serve_is_target_not_met_with_the_numbers(api, namespace, start_operator):
    kubectl = Kubectl(api, namespace)
    start_operator()
    kubectl.create("overloaded", small(workload={"rate": 500, "dataset": "chatbot"}))
    missed = wait_for(lambda: _condition(kubectl, "overloaded", "TargetNotMet"), timeout=60, what="TargetNotMet")
    status = kubectl.status("overloaded")
    plan = status["plan"]
    assert plan["predictedAttainment"] < 0.9
    assert "500 req/s" in missed["message"] and "target 90%" in missed["message"]
    assert f"{plan['goodputRps']:.3g} req/s" in missed["message"]
    assert _condition(kubectl, "overloaded", "Degraded")["reason"] == "TargetNotMet"
    assert _condition(kubectl, "overloaded", "Planned")  # the budget's best plan is still rolled out
    assert kubectl.children("overloaded")


@pytest.mark.parametrize("spec,field", [
    (small(cluster={"nodes": 2, "gpusPerNode": 4, "gpuType": None}), "cluster.gpuType"),
    (small(workload={"rate": 1.0, "dataset": None, "inputLengths": {"edges": [1, 2, 3], "counts": [1e308, 1e308]},
                     "outputLengths": {"edges": [1, 2], "counts": [1]}}), "spec.workload.inputLengths.counts"),
    (small(workload={"rate": 1.0, "dataset": None, "inputLengths": {"edges": [1500, 3000], "counts": [1]},
                     "outputLengths": {"edges": [1, 2], "counts": [1]}}), "workload.inputLengths reaches"),
    (small(workload={"rate": 1e-300, "dataset": "chatbot"}), "spec.workload.rate"),
])
def test_specs_the_planner_cannot_use_are_invalid_naming_the_field(api, namespace, start_operator, spec, field):
    kubectl = Kubectl(api, namespace)
    operator = start_operator()
    try:
        kubectl.create("bad", spec)
    except kubernetes.client.ApiException as exc:  # a real API server may refuse it at admission already
        assert exc.status == 422
        return
    degraded = wait_for(lambda: _condition(kubectl, "bad", "Degraded"), what="InvalidSpec")
    assert degraded["reason"] == "InvalidSpec" and field in degraded["message"], degraded
    assert operator.thread.is_alive() and not operator.errors


def test_a_mangled_status_plan_from_another_writer_is_replanned_not_a_crash(api, namespace, start_operator):
    kubectl = Kubectl(api, namespace)
    operator = start_operator()
    kubectl.create("mangled", small())
    planned = wait_for(lambda: (s := kubectl.status("mangled")).get("plan") and s, what="planned")
    crs = kubernetes.client.CustomObjectsApi(api)
    crs.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "mangled", {
        "status": {"planHash": planned["planHash"], "plan": {"mode": 7, "gpus": "many"}}})
    operator.stop()
    operator = start_operator()  # a fresh operator reads the mangled plan back as it resumes
    cr = kubectl.patch_spec("mangled", {"runtime": {"image": "example.com/runtime:2"}})
    status = wait_for(lambda: (s := kubectl.status("mangled")).get("observedGeneration") == cr["metadata"]["generation"]
                      and isinstance(s.get("plan", {}).get("gpus"), int) and s, what="a valid plan again")
    assert status["plan"]["mode"] in ("disaggregated", "colocated")
    assert operator.thread.is_alive() and not operator.errors


@pytest.fixture(autouse=True)
def _quiet_kopf_permanent_errors(caplog):
    caplog.set_level("CRITICAL", logger="kopf.objects")


def test_legal_names_that_are_no_service_names_still_roll_out_valid_children(api, namespace, start_operator):
    from disagg_operator.validation import child_problems

    kubectl = Kubectl(api, namespace)
    operator = start_operator()
    names = ["chat.bot.v1", "1chat", "n" * 63]
    for name in names:
        kubectl.create(name, small())
    for name in names:
        children = wait_for(lambda n=name: (s := kubectl.status(n)).get("children")
                            and len(kubectl.children(n)) == len(s["children"]) and kubectl.children(n),
                            what=f"{name} rolled out")
        for obj in children.values():
            assert child_problems(obj) == [], obj["metadata"]["name"]
    assert operator.thread.is_alive() and not operator.errors
