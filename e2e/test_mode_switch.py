"""spec.mode auto with the real planner: a workload that colocation serves best renders colocated workers; a
workload change that makes disaggregation win rolls the disaggregated plan out beside the colocated one, which
goes only once the new workloads are ready."""

from __future__ import annotations

import json

import pytest

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import small
from .test_rollout import WORKLOADS, _condition, _status_when

# A tight TPOT (40 ms) with the paper's OPT-13B on 1-GPU instances: chatbot's short answers are served best by
# one chunked-prefill colocated instance; code's long prompts stall colocated decodes past the TPOT, so
# separate prefill and decode instances serve more per GPU.
SLO = {"ttftMs": 2000, "tpotMs": 40}


@pytest.fixture
def kubectl(api, namespace, cluster) -> Kubectl:
    if cluster.real:
        pytest.skip("needs the emulator: the test plays the workload controllers")
    return Kubectl(api, namespace)


def _workloads(children: list[str], prefix: str) -> list[str]:
    return sorted(k for k in children if k.startswith(f"StatefulSet/{prefix}"))


def _args(sts: dict) -> list[list[str]]:
    return [c["args"] for c in sts["spec"]["template"]["spec"]["containers"]]


def test_auto_mode_serves_colocated_then_rolls_out_disaggregated_when_the_workload_changes(kubectl, start_operator):
    start_operator()
    kubectl.create("modes", small(workload={"rate": 2.0, "dataset": "chatbot"}, slo=SLO))
    cr_gen = kubectl.get("modes")["metadata"]["generation"]
    status = wait_for(lambda: (s := kubectl.status("modes")).get("observedGeneration") == cr_gen and s,
                      what="first plan", timeout=60)
    plan = status["plan"]
    assert plan["mode"] == "colocated" and plan["colocatedPrefill"] == "chunked"
    assert {a["mode"] for a in plan["alternatives"]} == {"disaggregated", "colocated", "colocated-chunked"}
    assert "colocated-chunked:" in _condition(status, "Planned")["message"]
    [colocated] = _workloads(status["children"], "modes-colocated-")
    assert not _workloads(status["children"], "modes-prefill-") and not _workloads(status["children"], "modes-decode-")
    children = kubectl.children("modes")
    [args] = _args(children[colocated])
    assert args[args.index("--role") + 1] == "colocated"
    assert args[args.index("--colocated-prefill") + 1] == "chunked"
    assert args[args.index("--chunk-token-budget") + 1] == str(plan["chunkTokenBudget"])
    endpoints = json.loads(kubectl.config_map("modes-plan")["endpoints.json"])
    assert len(endpoints["colocated"]) == plan["colocated"]["replicas"] and not endpoints.get("prefill")
    for key in children:
        if key.split("/")[0] in WORKLOADS:
            kubectl.report_ready(key)
    wait_for(lambda: kubectl.status("modes").get("phase") == "Ready", what="phase Ready")

    cr = kubectl.patch_spec("modes", {"workload": {"rate": 2.0, "dataset": "code"}})
    status = wait_for(lambda: _status_when(kubectl, "modes", cr["metadata"]["generation"], "RollingOut"),
                      what="Progressing/RollingOut", timeout=60)
    plan = status["plan"]
    assert plan["mode"] == "disaggregated"
    assert plan["choice"].startswith("disaggregated:")
    [prefill] = _workloads(status["children"], "modes-prefill-")
    [decode] = _workloads(status["children"], "modes-decode-")
    old_name = colocated.split("/", 1)[1]
    assert status["retiring"] == [f"Service/{old_name}", colocated]
    # The colocated workers keep serving, listed beside the new plan's pods.
    endpoints = json.loads(kubectl.config_map("modes-plan")["endpoints.json"])
    assert endpoints["colocated"] and endpoints["prefill"] and endpoints["decode"]
    assert colocated in kubectl.children("modes")

    kubectl.report_ready(prefill)
    assert colocated in kubectl.children("modes")  # one new workload ready is not the new plan ready
    kubectl.report_ready(decode)
    done = wait_for(lambda: (s := kubectl.status("modes")).get("phase") == "Ready" and s, what="rollout complete")
    assert done["retiring"] == [] and colocated not in kubectl.children("modes")
    endpoints = json.loads(kubectl.config_map("modes-plan")["endpoints.json"])
    assert not endpoints.get("colocated") and endpoints["prefill"] and endpoints["decode"]
