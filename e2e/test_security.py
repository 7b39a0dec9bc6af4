"""Lock-down through the operator: the internal-token Secret and the NetworkPolicies are children like the
others (owned, listed, deleted with the DisaggServing), and rotating the token rolls the pods the way a
new shape does: the serving workers stay listed for the router until the new ones are ready."""

from __future__ import annotations

import base64
import json
import time

import pytest
from disagg_operator.credentials import TOKEN_VERSION_ANNOTATION

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import fixed_plan, small

WORKLOADS = ("StatefulSet", "Deployment")


@pytest.fixture
def kubectl(api, namespace) -> Kubectl:
    return Kubectl(api, namespace)


def _two_per_phase(spec, profile=None, *, workers=None, progress=None):
    return fixed_plan(spec.workload.rate, prefill=(1, 2), decode=(1, 2))


def _tokens(secret: dict) -> list[str]:
    return base64.b64decode(secret["data"]["tokens"]).decode().split()


def _status_at(kubectl: Kubectl, name: str, generation: int) -> dict | None:
    status = kubectl.status(name)
    return status if status.get("observedGeneration") == generation and status.get("phase") else None


def _report_all_ready(kubectl: Kubectl, name: str) -> None:
    for key in kubectl.children(name):
        if key.split("/")[0] in WORKLOADS:
            kubectl.report_ready(key)


def test_token_secret_and_network_policies_are_owned_children(kubectl, start_operator, cluster):
    start_operator(plan_fn=_two_per_phase)
    cr = kubectl.create("lock", small(router={"apiKeySecretRef": {"name": "lock-keys"}}))
    status = wait_for(lambda: _status_at(kubectl, "lock", cr["metadata"]["generation"]), what="rollout")
    children = kubectl.children("lock")
    assert sorted(children) == sorted(status["children"])
    secret = children["Secret/lock-internal-token"]
    policies = sorted(k for k in children if k.startswith("NetworkPolicy/"))
    assert policies == [f"NetworkPolicy/lock-np-{p}" for p in sorted(
        ("decode-http", "default-deny", "kv-nccl", "prefill-http", "prefill-kv", "router"))]
    for key in ("Secret/lock-internal-token", *policies):
        [ref] = children[key]["metadata"]["ownerReferences"]
        assert ref["uid"] == cr["metadata"]["uid"] and ref["controller"] is True, key
    [token] = _tokens(secret)
    assert len(token) >= 40
    # The token is nowhere but in its Secret: not in the status, the Events or any other child.
    others = {k: v for k, v in children.items() if k != "Secret/lock-internal-token"}
    assert token not in json.dumps(status) and token not in json.dumps(others)
    assert token not in json.dumps([e.get("message") for e in kubectl.events("lock")])
    for key, obj in children.items():
        if key.startswith(WORKLOADS):
            volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
            assert volumes["internal-token"]["secret"]["secretName"] == "lock-internal-token"
            assert ("api-keys" in volumes) == key.startswith("Deployment/")

    # A reconcile that changes nothing leaves the token alone (no re-issue on resume or update).
    cr = kubectl.patch_spec("lock", {"runtime": {"image": "ghcr.io/disagg/runtime:0.1.1"}})
    wait_for(lambda: _status_at(kubectl, "lock", cr["metadata"]["generation"]), what="image update")
    assert _tokens(kubectl.children("lock")["Secret/lock-internal-token"]) == [token]

    # Opting out of network policies prunes them.
    cr = kubectl.patch_spec("lock", {"networkPolicy": {"enabled": False}})
    wait_for(lambda: _status_at(kubectl, "lock", cr["metadata"]["generation"]), what="opt-out")
    wait_for(lambda: not any(k.startswith("NetworkPolicy/") for k in kubectl.children("lock")), what="policies pruned")

    kubectl.delete("lock")
    wait_for(lambda: kubectl.children("lock") == {}, what="children deleted with their owner")


def test_rotating_the_token_rolls_the_pods_beside_the_serving_ones(kubectl, start_operator, cluster):
    if cluster.real:
        pytest.skip("needs the emulator: the test plays the workload controllers")
    start_operator(plan_fn=_two_per_phase)
    kubectl.create("rot", small())
    cr_gen = kubectl.get("rot")["metadata"]["generation"]
    wait_for(lambda: _status_at(kubectl, "rot", cr_gen), what="first rollout")
    _report_all_ready(kubectl, "rot")
    wait_for(lambda: kubectl.status("rot").get("phase") == "Ready", what="Ready")
    before = kubectl.children("rot")
    [old_token] = _tokens(before["Secret/rot-internal-token"])
    old_workers = sorted(k for k in before if k.startswith("StatefulSet/"))
    old_endpoints = json.loads(kubectl.config_map("rot-plan")["endpoints.json"])

    cr = kubectl.patch_spec("rot", {"internalToken": {"rotation": 1}})
    status = wait_for(lambda: (s := _status_at(kubectl, "rot", cr["metadata"]["generation"]))
                      and s.get("retiring") and s, what="rotation rolling out")
    children = kubectl.children("rot")
    new_token, previous = _tokens(children["Secret/rot-internal-token"])
    assert previous == old_token and new_token != old_token  # old pods keep working with the new ones
    new_workers = sorted(k for k in status["children"] if k.startswith("StatefulSet/"))
    assert set(new_workers).isdisjoint(old_workers) and len(new_workers) == len(old_workers)
    # The serving workers are untouched and still in the router's list, beside the new ones.
    assert sorted(k for k in status["retiring"] if k.startswith("StatefulSet/")) == old_workers
    for key in old_workers:
        assert children[key]["metadata"]["resourceVersion"] == before[key]["metadata"]["resourceVersion"]
    endpoints = json.loads(kubectl.config_map("rot-plan")["endpoints.json"])
    for role in ("prefill", "decode"):
        assert set(old_endpoints[role]) < set(endpoints[role]) and len(endpoints[role]) == 4
    # The new workers carry the new token's version; the router is not restarted (it re-reads the token).
    versions = {children[k]["spec"]["template"]["metadata"]["annotations"][TOKEN_VERSION_ANNOTATION]
                for k in new_workers}
    assert versions and versions.isdisjoint({before[k]["spec"]["template"]["metadata"]["annotations"]
                                             [TOKEN_VERSION_ANNOTATION] for k in old_workers})
    assert children["Deployment/rot-router"]["spec"]["template"] == before["Deployment/rot-router"]["spec"]["template"]

    # Only some of the new workers ready: the old ones keep serving.
    kubectl.report_ready(new_workers[0])
    time.sleep(0.5)
    assert all(k in kubectl.children("rot") for k in old_workers)
    for key in new_workers[1:]:
        kubectl.report_ready(key)
    done = wait_for(lambda: (s := kubectl.status("rot")).get("phase") == "Ready" and s, what="rotation complete")
    assert done["retiring"] == []
    left = kubectl.children("rot")
    assert not any(k in left for k in old_workers)
    endpoints = json.loads(kubectl.config_map("rot-plan")["endpoints.json"])
    assert all(len(endpoints[role]) == 2 and not set(endpoints[role]) & set(old_endpoints[role])
               for role in ("prefill", "decode"))
