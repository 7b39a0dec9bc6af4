"""A re-plan rolls out without dropping capacity: the new plan's workloads come up beside the serving ones,
which go only once the new ones are ready; a change that keeps the plan updates in place.

The emulator runs no workload controllers, so the tests write what they would (`Kubectl.report_ready`:
observedGeneration and readyReplicas once every pod passes its readiness probe).
"""

from __future__ import annotations

import json
import time

import pytest

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import by_group, container_gpus, fixed_plan, small

WORKLOADS = ("StatefulSet", "Deployment")


@pytest.fixture
def kubectl(api, namespace, cluster) -> Kubectl:
    if cluster.real:
        pytest.skip("needs the emulator: the test plays the workload controllers")
    return Kubectl(api, namespace)


def _decode_widens(spec, profile=None, *, workers=None, progress=None):
    """Planner stand-in: below 3 req/s 2x tp1 per phase; from 3 req/s decode widens to tp2 (a new shape) and
    prefill grows to 3 replicas (same shape); from 6 req/s decode widens again, to tp4."""
    rate = spec.workload.rate
    if rate < 3:
        return fixed_plan(rate, prefill=(1, 2), decode=(1, 2))
    return fixed_plan(rate, prefill=(1, 3), decode=(2, 1) if rate < 6 else (4, 1))


def _condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def _status_when(kubectl: Kubectl, name: str, generation: int, reason: str) -> dict | None:
    status = kubectl.status(name)
    if status.get("observedGeneration") == generation and _condition(status, "Progressing")["reason"] == reason:
        return status
    return None


def _name(keys: list[str], kind: str, group: str) -> str:
    [name] = [k.split("/", 1)[1] for k in keys if k.startswith(f"{kind}/{group}-")]
    return name


def _ready_and_serving(kubectl: Kubectl, name: str) -> dict:
    cr_gen = kubectl.get(name)["metadata"]["generation"]
    wait_for(lambda: kubectl.status(name).get("observedGeneration") == cr_gen, what="rollout")
    for key in kubectl.children(name):
        if key.split("/")[0] in WORKLOADS:
            kubectl.report_ready(key)
    return wait_for(lambda: (s := kubectl.status(name)).get("phase") == "Ready" and s, what="phase Ready")


def test_a_new_shape_rolls_out_beside_the_serving_plan(kubectl, start_operator):
    start_operator(plan_fn=_decode_widens)
    kubectl.create("roll", small(workload={"rate": 1.0, "dataset": "chatbot"}))
    before = _ready_and_serving(kubectl, "roll")
    old_children = kubectl.children("roll")
    old_decode = _name(before["children"], "StatefulSet", "roll-decode")
    prefill = _name(before["children"], "StatefulSet", "roll-prefill")

    cr = kubectl.patch_spec("roll", {"workload": {"rate": 4.0}})
    status = wait_for(lambda: _status_when(kubectl, "roll", cr["metadata"]["generation"], "RollingOut"),
                      what="Progressing/RollingOut")
    assert status["phase"] == "Progressing" and _condition(status, "Ready")["reason"] == "RollingOut"
    new_decode = _name(status["children"], "StatefulSet", "roll-decode")
    assert new_decode != old_decode
    assert status["retiring"] == [f"Service/{old_decode}", f"StatefulSet/{old_decode}"]
    children = kubectl.children("roll")
    assert set(children) == set(status["children"]) | set(status["retiring"])
    # The serving decode workload and its Service are left exactly as they were.
    for key in status["retiring"]:
        assert children[key]["metadata"]["resourceVersion"] == old_children[key]["metadata"]["resourceVersion"]
    assert container_gpus(children[f"StatefulSet/{new_decode}"]) == {"decode": 2}
    # Prefill kept its shape: scaled in place, pod template untouched (no restart of its serving pods).
    assert children[f"StatefulSet/{prefill}"]["spec"]["replicas"] == 3
    for key in (f"StatefulSet/{prefill}", "Deployment/roll-router"):
        assert children[key]["spec"]["template"] == old_children[key]["spec"]["template"], key
    # The router lists both plans' decode pods while both serve.
    endpoints = json.loads(kubectl.config_map("roll-plan")["endpoints.json"])
    assert endpoints["decode"] == [f"http://{new_decode}-0.{new_decode}.{kubectl.namespace}.svc:8001"] + [
        f"http://{old_decode}-{i}.{old_decode}.{kubectl.namespace}.svc:8001" for i in range(2)]
    assert len(endpoints["prefill"]) == 3

    # Prefill's new replica gets ready; the new decode is not yet: the old decode keeps serving.
    kubectl.report_ready(f"StatefulSet/{prefill}")
    time.sleep(0.5)
    assert f"StatefulSet/{old_decode}" in kubectl.children("roll")
    assert kubectl.status("roll")["retiring"] == status["retiring"]

    kubectl.report_ready(f"StatefulSet/{new_decode}")
    done = wait_for(lambda: (s := kubectl.status("roll")).get("phase") == "Ready" and s, what="rollout complete")
    assert done["retiring"] == [] and _condition(done, "Progressing")["reason"] == "RolloutComplete"
    assert set(kubectl.children("roll")) == set(done["children"])
    endpoints = json.loads(kubectl.config_map("roll-plan")["endpoints.json"])
    assert endpoints["decode"] == [f"http://{new_decode}-0.{new_decode}.{kubectl.namespace}.svc:8001"]
    # Events are posted after the status is written: wait for it, do not race it.
    wait_for(lambda: any(e.get("reason") == "Ready" and "deleted 2 children of the previous plan" in
                         e.get("message", "") for e in kubectl.events("roll")), what="the Ready Event")


def test_a_plan_superseded_before_it_served_is_dropped_at_once(kubectl, start_operator):
    start_operator(plan_fn=_decode_widens)
    kubectl.create("hop", small(workload={"rate": 1.0, "dataset": "chatbot"}))
    serving = _name(_ready_and_serving(kubectl, "hop")["children"], "StatefulSet", "hop-decode")
    cr = kubectl.patch_spec("hop", {"workload": {"rate": 4.0}})
    middle = _name(wait_for(lambda: _status_when(kubectl, "hop", cr["metadata"]["generation"], "RollingOut"),
                            what="first rollout")["children"], "StatefulSet", "hop-decode")

    cr = kubectl.patch_spec("hop", {"workload": {"rate": 7.0}})
    status = wait_for(lambda: _status_when(kubectl, "hop", cr["metadata"]["generation"], "RollingOut"),
                      what="second rollout")
    latest = _name(status["children"], "StatefulSet", "hop-decode")
    decode = {k for k in kubectl.children("hop") if k.startswith("StatefulSet/hop-decode-")}
    # tp2 never had a ready pod: gone at once. tp1 serves until tp4 is ready: no capacity dropped.
    assert decode == {f"StatefulSet/{serving}", f"StatefulSet/{latest}"} and middle not in decode
    assert status["retiring"] == [f"Service/{serving}", f"StatefulSet/{serving}"]


def test_a_spec_change_that_keeps_the_plan_updates_in_place(kubectl, start_operator):
    operator = start_operator()
    kubectl.create("img", small(workload={"rate": 1.0, "dataset": "code"}))
    before = _ready_and_serving(kubectl, "img")
    cr = kubectl.patch_spec("img", {"runtime": {"image": "registry.example/disagg-runtime:2"}})
    status = wait_for(lambda: (s := kubectl.status("img")).get("observedGeneration") == cr["metadata"]["generation"]
                      and s, what="update")
    assert status["planHash"] == before["planHash"] and operator.ctx.planning.searches == 1
    assert status["children"] == before["children"] and status["retiring"] == []
    children = kubectl.children("img")
    assert set(children) == set(before["children"])
    for sts in by_group(children).values():
        assert {c["image"] for c in sts["spec"]["template"]["spec"]["containers"]} == {
            "registry.example/disagg-runtime:2"}
    # The workloads' controllers now roll the pods (a template change): Progressing until they report.
    assert status["phase"] == "Progressing"
    assert _condition(status, "Progressing")["reason"] == "ChildrenApplied"


def test_an_operator_restarted_mid_rollout_finishes_it(kubectl, start_operator):
    first = start_operator(plan_fn=_decode_widens)
    kubectl.create("resume", small(workload={"rate": 1.0, "dataset": "chatbot"}))
    serving = _name(_ready_and_serving(kubectl, "resume")["children"], "StatefulSet", "resume-decode")
    cr = kubectl.patch_spec("resume", {"workload": {"rate": 4.0}})
    status = wait_for(lambda: _status_when(kubectl, "resume", cr["metadata"]["generation"], "RollingOut"),
                      what="rollout")
    first.stop()

    # The state is in the cluster, not in the operator: the resumed reconcile keeps the serving plan.
    second = start_operator(plan_fn=_decode_widens)
    wait_for(lambda: second.ctx.planning.hits, what="the resumed reconcile")
    assert kubectl.status("resume")["retiring"] == status["retiring"]
    for key in status["children"]:
        if key.startswith("StatefulSet/"):
            kubectl.report_ready(key)
    done = wait_for(lambda: (s := kubectl.status("resume")).get("phase") == "Ready" and s, what="rollout complete")
    assert done["retiring"] == [] and f"StatefulSet/{serving}" not in kubectl.children("resume")
    assert second.ctx.planning.searches == 0  # planned before the restart: the status seeds the cache
