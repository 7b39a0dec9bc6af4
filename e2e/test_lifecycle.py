"""A DisaggServing's life through the operator: create -> children, update -> new children, delete -> gone."""

from __future__ import annotations

import time

import kubernetes_validate
import pytest
from disagg_operator import labels as lb

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import by_group, container_gpus, expected_workloads, small

K8S_VERSION = "1.30"


@pytest.fixture
def kubectl(api, namespace) -> Kubectl:
    return Kubectl(api, namespace)


def _rolled_out(kubectl: Kubectl, name: str, generation: int):
    status = kubectl.status(name)
    if status.get("phase") in ("Progressing", "Ready") and status.get("observedGeneration") == generation:
        return status
    return None


def test_create_update_delete(kubectl, start_operator, capsys):
    operator = start_operator()
    created = time.monotonic()
    cr = kubectl.create("chat", small())

    status = wait_for(lambda: _rolled_out(kubectl, "chat", cr["metadata"]["generation"]), what="rollout")
    children = kubectl.children("chat")
    elapsed = time.monotonic() - created
    with capsys.disabled():
        print(f"\n[e2e] DisaggServing created -> {len(children)} children applied and status written: "
              f"{elapsed:.2f} s (goal < 2 s), of which plan search {operator.ctx.planning.search_seconds:.2f} s")

    # Every child listed in the status exists, owned by the CR, labelled with the plan.
    assert sorted(children) == sorted(status["children"])
    uid = cr["metadata"]["uid"]
    for key, obj in children.items():
        meta = obj["metadata"]
        assert meta["ownerReferences"][0]["uid"] == uid, key
        assert meta["ownerReferences"][0]["controller"] is True
        assert meta["labels"][lb.INSTANCE] == "chat" and meta["labels"][lb.PLAN_HASH] == status["planHash"], key
        kubernetes_validate.validate(_without_server_fields(obj), K8S_VERSION, strict=True)

    # Workloads carry the planned shapes, GPU requests and scheduling.
    plan = status["plan"]
    workers = by_group(children)
    assert sorted(workers) == sorted(expected_workloads("chat", plan))
    for sts_name, want in expected_workloads("chat", plan).items():
        sts = workers[sts_name]
        assert sts["spec"]["replicas"] == want["replicas"]
        assert container_gpus(sts) == want["gpus"]
        pod = sts["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "A100-80GB"
        assert pod["tolerations"] == small()["scheduling"]["tolerations"]
        assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert "Deployment/chat-router" in children and "Service/chat" in children

    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Planned"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
    assert conditions["Progressing"]["status"] == "True"
    assert status["prefillShape"] and status["goodputRps"] > 0
    if plan["mode"] == "disaggregated":
        assert status["prefillShape"] == f"{plan['prefill']['replicas']}x tp{plan['prefill']['tp']}pp{plan['prefill']['pp']}"

    # Change the workload: a new plan, children re-applied under the new hash, generation observed.
    updated = kubectl.patch_spec("chat", {"workload": {"rate": 4.0}})
    generation = updated["metadata"]["generation"]
    assert generation > cr["metadata"]["generation"]
    status2 = wait_for(lambda: _rolled_out(kubectl, "chat", generation), what="rollout of the update")
    assert status2["planHash"] != status["planHash"]
    assert status2["plan"]["targetRateRps"] == pytest.approx(4.0)
    children2 = kubectl.children("chat")
    assert sorted(children2) == sorted(status2["children"])
    assert all(o["metadata"]["labels"][lb.PLAN_HASH] == status2["planHash"] for o in children2.values())
    for sts_name, want in expected_workloads("chat", status2["plan"]).items():
        assert by_group(children2)[sts_name]["spec"]["replicas"] == want["replicas"]
    assert any(e.get("reason") == "Planned" for e in kubectl.events("chat"))

    kubectl.delete("chat")
    wait_for(lambda: not kubectl.children("chat"), what="children deleted with their DisaggServing")


def test_second_reconcile_changes_nothing(kubectl, start_operator):
    first = start_operator()
    cr = kubectl.create("code", small(workload={"rate": 2.0, "dataset": "code"}))
    wait_for(lambda: _rolled_out(kubectl, "code", cr["metadata"]["generation"]), what="rollout")
    versions = {k: o["metadata"]["resourceVersion"] for k, o in kubectl.children("code").items()}
    first.stop()

    # A restarted operator resumes the resource: same plan (from the status, no search), no writes.
    second = start_operator()
    wait_for(lambda: second.ctx.planning.hits, what="the resumed reconcile")
    time.sleep(0.5)
    assert second.ctx.planning.searches == 0
    assert {k: o["metadata"]["resourceVersion"] for k, o in kubectl.children("code").items()} == versions


def test_paused_plans_and_applies_nothing(kubectl, start_operator):
    start_operator()
    kubectl.create("whatif", small(paused=True))
    status = wait_for(lambda: kubectl.status("whatif").get("phase") == "Paused" and kubectl.status("whatif"),
                      what="paused status")
    assert status["plan"] and status["children"], "a paused resource still reports what it would create"
    assert kubectl.children("whatif") == {}

    # Un-pausing rolls the reported plan out without a new search.
    cr = kubectl.patch_spec("whatif", {"paused": False})
    status2 = wait_for(lambda: _rolled_out(kubectl, "whatif", cr["metadata"]["generation"]), what="rollout")
    assert status2["planHash"] == status["planHash"]
    assert sorted(kubectl.children("whatif")) == sorted(status["children"])


def test_ready_once_workloads_report_ready(kubectl, start_operator, cluster):
    if cluster.real:
        pytest.skip("needs the emulator: on a real cluster readiness depends on GPUs and images")
    start_operator()
    cr = kubectl.create("sum", small(workload={"rate": 1.0, "dataset": "summarization"}))
    status = wait_for(lambda: _rolled_out(kubectl, "sum", cr["metadata"]["generation"]), what="rollout")
    assert status["phase"] == "Progressing"
    for key, obj in kubectl.children("sum").items():
        if key.split("/")[0] in ("StatefulSet", "Deployment"):
            kubectl.patch_workload_status(key, {"observedGeneration": obj["metadata"]["generation"],
                                                "replicas": obj["spec"]["replicas"],
                                                "readyReplicas": obj["spec"]["replicas"]})
    wait_for(lambda: kubectl.status("sum").get("phase") == "Ready", what="phase Ready")
    assert kubectl.condition("sum", "Ready")["status"] == "True"
    assert kubectl.condition("sum", "Progressing")["status"] == "False"


def _without_server_fields(obj: dict) -> dict:
    """A child as it was applied: drop what an API server adds (status, uid, versions)."""
    meta = {k: v for k, v in obj["metadata"].items()
            if k not in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}


def _two_then_one_shape(spec, profile=None, *, workers=None, progress=None):
    """Planner stand-in for the pruning test: disaggregated below 3 req/s, colocated from 3 req/s.

    The real planner's choice depends on its models; this test is about what the operator does
    when a plan drops a phase, so the plans are fixed here.
    """
    from disagg_planner.api import PhasePlan, Plan

    rate = spec.workload.rate
    one = PhasePlan(tp=1, pp=1, replicas=2, instance_goodput_rps=2.0)
    if rate >= 3:
        return Plan(mode="colocated", affinity="high", colocated=one, gpus=2, target_rate_rps=rate,
                    goodput_rps=4.0, per_gpu_goodput=2.0, predicted_attainment=0.95)
    return Plan(mode="disaggregated", affinity="high", prefill=one, decode=one, gpus=4, target_rate_rps=rate,
                goodput_rps=4.0, per_gpu_goodput=1.0, predicted_attainment=0.95)


def test_plan_dropping_a_phase_deletes_its_children(kubectl, start_operator):
    start_operator(plan_fn=_two_then_one_shape)
    cr = kubectl.create("shrink", small(workload={"rate": 1.0, "dataset": "chatbot"}))
    wait_for(lambda: _rolled_out(kubectl, "shrink", cr["metadata"]["generation"]), what="rollout")
    assert set(by_group(kubectl.children("shrink"))) == {"shrink-prefill", "shrink-decode"}

    cr = kubectl.patch_spec("shrink", {"workload": {"rate": 3.5}})
    status = wait_for(lambda: _rolled_out(kubectl, "shrink", cr["metadata"]["generation"]), what="re-plan")
    after = kubectl.children("shrink")
    assert set(after) == set(status["children"])
    # No pod of the old plan was ready (the emulator runs none): nothing to keep serving, pruned at once.
    assert set(by_group(after)) == set(by_group(after, "Service")) == {"shrink-colocated"}
    assert status["retiring"] == []
    assert status["prefillShape"] == status["decodeShape"] == "2x tp1pp1 (colocated)"
