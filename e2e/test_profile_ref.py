"""spec.profile.configMapRef: the operator plans with the profile in a ConfigMap of the resource's namespace;
a missing or unusable one is Degraded with the reason, and heals once the ConfigMap is there."""

from __future__ import annotations

import json

import pytest

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import profile_json, small


@pytest.fixture
def kubectl(api, namespace) -> Kubectl:
    return Kubectl(api, namespace)


def _degraded(kubectl: Kubectl, name: str, reason: str) -> dict | None:
    cond = kubectl.condition(name, "Degraded")
    return cond if cond and cond["status"] == "True" and cond["reason"] == reason else None


def _planned(kubectl: Kubectl, name: str, generation: int) -> dict | None:
    status = kubectl.status(name)  # one read: conditions and the rest of the status of the same moment
    degraded = next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), None)
    if status.get("observedGeneration") == generation and degraded and degraded["status"] == "False":
        return status
    return None


def test_profile_config_map_created_after_the_resource(kubectl, start_operator):
    operator = start_operator()
    cr = kubectl.create("prof", small(profile={"configMapRef": {"name": "opt13b-a100"}}))
    degraded = wait_for(lambda: _degraded(kubectl, "prof", "ProfileNotFound"), what="Degraded ProfileNotFound")
    assert f"ConfigMap {kubectl.namespace}/opt13b-a100 does not exist" in degraded["message"]
    assert kubectl.status("prof")["phase"] == "Degraded" and kubectl.condition("prof", "Planned")["status"] == "False"
    assert kubectl.children("prof") == {}

    # The operator retries on its own: creating the ConfigMap is enough.
    kubectl.put_config_map("opt13b-a100", {"profile.json": profile_json()})
    status = wait_for(lambda: _planned(kubectl, "prof", cr["metadata"]["generation"]), timeout=30,
                      what="planned with the profile")
    assert status["phase"] == "Progressing" and status["plan"]["latencySource"] == "profile"
    assert not status["planHash"].endswith("-analytic")
    shipped = json.loads(kubectl.config_map("prof-plan")["profile.json"])
    assert shipped == json.loads(profile_json())  # the runtime pods see the profile they were planned with

    # The profile's content is in the planning key: an edited profile is planned again at the next
    # reconcile (here: an image change, which alone would not re-plan).
    searches = operator.ctx.planning.searches
    kubectl.put_config_map("opt13b-a100", {"profile.json": profile_json(per_token_s=3e-4)})
    cr = kubectl.patch_spec("prof", {"runtime": {"image": "registry.example/disagg-runtime:2"}})
    status2 = wait_for(lambda: _planned(kubectl, "prof", cr["metadata"]["generation"]), what="re-plan")
    assert status2["planHash"] != status["planHash"]
    assert status2["planHash"].split("-")[0] == status["planHash"].split("-")[0]  # same spec planning hash
    assert operator.ctx.planning.searches == searches + 1


def test_unusable_profile_degrades_then_heals_when_fixed(kubectl, start_operator):
    start_operator()
    kubectl.put_config_map("profiles", {"profile.json": "{not json", "h100.json": profile_json(gpu="H100-80GB")})
    cr = kubectl.create("garbage", small(profile={"configMapRef": {"name": "profiles"}}))
    wrong = kubectl.create("wronggpu", small(profile={"configMapRef": {"name": "profiles", "key": "h100.json"}}))
    garbage = wait_for(lambda: _degraded(kubectl, "garbage", "InvalidProfile"), what="Degraded InvalidProfile")
    assert "profiles[profile.json] is not a latency profile" in garbage["message"]
    mismatch = wait_for(lambda: _degraded(kubectl, "wronggpu", "InvalidProfile"), what="GPU mismatch")
    assert "was measured on 'H100-80GB', but the cluster's GPU type is 'A100-80GB'" in mismatch["message"]
    # Events are posted after the status is written: wait for the warning, do not race it.
    wait_for(lambda: any(e.get("reason") == "InvalidProfile" for e in kubectl.events("garbage")),
             what="a warning Event")
    assert kubectl.children("garbage") == {} and kubectl.children("wronggpu") == {}

    kubectl.put_config_map("profiles", {"profile.json": profile_json(), "h100.json": profile_json(gpu="H100-80GB")})
    status = wait_for(lambda: _planned(kubectl, "garbage", cr["metadata"]["generation"]), timeout=30,
                      what="recovery once the profile is fixed")
    assert status["plan"]["latencySource"] == "profile"
    assert sorted(kubectl.children("garbage")) == sorted(status["children"])
    assert _degraded(kubectl, "wronggpu", "InvalidProfile") and wrong["metadata"]["generation"] == 1
