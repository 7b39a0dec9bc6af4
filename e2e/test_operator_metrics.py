"""The operator's /metrics: the plan in force of a DisaggServing it planned, read back over HTTP."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import small


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_operator_exports_the_plan_in_force(api, namespace, start_operator):
    port = _free_port()
    start_operator(metrics_port=port)
    kubectl = Kubectl(api, namespace)
    kubectl.create("chat", small())
    status = wait_for(lambda: kubectl.status("chat") if kubectl.status("chat").get("planHash") else None,
                      what="a plan in the status")

    def plan_info():
        samples = _samples(port).get("disagg_operator_plan_info", [])
        return next((s for s in samples if s.labels["plan_hash"] == status["planHash"]), None)

    info = wait_for(plan_info, what="disagg_operator_plan_info for the plan")
    assert info.value == 1 and info.labels["namespace"] == namespace and info.labels["disaggserving"] == "chat"
    assert info.labels["prefill"] == (status.get("prefillShape") or "")
    samples = _samples(port)
    gpus = [s for s in samples["disagg_operator_plan_gpus"] if s.labels["disaggserving"] == "chat"]
    assert [s.value for s in gpus] == [status["gpus"]]
    replans = [s for s in samples["disagg_operator_replans"] if s.name.endswith("_total")]
    assert [s.value for s in replans if s.labels["disaggserving"] == "chat"] == [0.0]
    kubectl.delete("chat")
    wait_for(lambda: plan_info() is None, what="the series dropped with the resource")
