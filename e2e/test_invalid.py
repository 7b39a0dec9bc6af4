"""Invalid DisaggServings: rejected by the CRD schema or reported Degraded; the operator serves on."""

from __future__ import annotations

import kubernetes
import pytest

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import small

# name, spec, condition reason, text the message must contain
INVALID = [
    ("negative-slo", small(slo={"ttftMs": -5, "tpotMs": 100}), "InvalidSpec", "spec.slo.ttftMs"),
    ("wrong-type", small(cluster={"nodes": 2, "gpusPerNode": "eight"}), "InvalidSpec", "spec.cluster.gpusPerNode"),
    # A rule of the spec tree beyond the CRD's OpenAPI schema (which a real API server enforces itself).
    ("no-model", small(model={}), "InvalidSpec", "exactly one of model.preset or model.custom"),
    # Llama-3-70B needs ~140 GB of bf16 weights; one 80 GB GPU cannot hold them.
    ("too-few-gpus", small(model={"preset": "llama-3-70b", "path": "/models/llama-3-70b"},
                           search={"maxTp": 1, "maxPp": 1, "gpuBudget": 1}), "NoFeasiblePlan", "no feasible plan"),
]


def test_invalid_resources_degrade_and_others_are_still_served(api, namespace, start_operator):
    kubectl = Kubectl(api, namespace)
    operator = start_operator()
    accepted = []
    for name, spec, reason, fragment in INVALID:
        try:
            kubectl.create(name, spec)
        except kubernetes.client.ApiException as exc:
            # A real API server enforces the CRD's OpenAPI schema (bounds, types) at admission.
            assert exc.status == 422, exc
            continue
        accepted.append((name, reason, fragment))

    for name, reason, fragment in accepted:
        degraded = wait_for(lambda n=name: _degraded(kubectl, n), what=f"{name} Degraded")
        assert degraded["reason"] == reason, degraded
        assert fragment in degraded["message"], degraded
        status = kubectl.status(name)
        assert status["phase"] == "Degraded"
        planned = next(c for c in status["conditions"] if c["type"] == "Planned")
        assert planned["status"] == "False"
        assert kubectl.children(name) == {}, f"{name}: no children may be created for an invalid spec"
        wait_for(lambda n=name, r=reason: any(e.get("reason") == r for e in kubectl.events(n)),
                 what=f"{name}: a warning Event")

    # The operator keeps serving: a valid resource created afterwards rolls out.
    cr = kubectl.create("valid", small())
    wait_for(lambda: kubectl.status("valid").get("observedGeneration") == cr["metadata"]["generation"]
             and kubectl.children("valid"), what="the valid resource's rollout")
    assert operator.thread.is_alive() and not operator.errors


def test_fixing_an_invalid_spec_recovers(api, namespace, start_operator):
    kubectl = Kubectl(api, namespace)
    start_operator()
    kubectl.create("fixme", small(model={}))
    wait_for(lambda: _degraded(kubectl, "fixme"), what="Degraded")

    cr = kubectl.patch_spec("fixme", {"model": {"preset": "opt-13b", "path": "/models/opt-13b"}})
    status = wait_for(lambda: (s := kubectl.status("fixme")).get("phase") == "Progressing"
                      and s.get("observedGeneration") == cr["metadata"]["generation"] and s,
                      what="recovery after the fix")
    assert next(c for c in status["conditions"] if c["type"] == "Degraded")["status"] == "False"
    assert sorted(kubectl.children("fixme")) == sorted(status["children"])


def _degraded(kubectl: Kubectl, name: str) -> dict | None:
    cond = kubectl.condition(name, "Degraded")
    return cond if cond and cond["status"] == "True" else None


@pytest.fixture(autouse=True)
def _quiet_kopf_permanent_errors(caplog):
    # Permanent handler errors are expected here; kopf logs them at ERROR level.
    caplog.set_level("CRITICAL", logger="kopf.objects")
