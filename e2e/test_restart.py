"""Operator crashes and restarts: no duplicate children, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .conftest import REPO, wait_for
from .kubectl import Kubectl
from .specs import small


def _spawn_operator(kubeconfig, namespace: str) -> subprocess.Popen:
    """The operator as its own process (as in a pod), so it can be killed with SIGKILL mid-reconcile."""
    return subprocess.Popen(
        [sys.executable, "-m", "disagg_cli.operator", "--kubeconfig", str(kubeconfig), "--namespace", namespace,
         ],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_killed_mid_reconcile_then_restarted(api, namespace, cluster, start_operator):
    kubectl = Kubectl(api, namespace)
    if cluster.emulated:
        # Slow workload writes so the kill lands after the ConfigMap and before the StatefulSets.
        cluster.emulated.emulator.write_latency["statefulsets"] = 1.0
    first = _spawn_operator(cluster.kubeconfig, namespace)
    try:
        cr = kubectl.create("crash", small())
        wait_for(lambda: "ConfigMap/crash-plan" in kubectl.children("crash"), timeout=60, what="first children")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        output = first.stdout.read().decode(errors="replace") if first.stdout else ""
    partial = kubectl.children("crash")
    if cluster.emulated:
        cluster.emulated.emulator.write_latency.clear()
        assert not any(k.startswith("StatefulSet/") for k in partial), f"killed too late:\n{partial}\n{output}"

    start_operator()
    status = wait_for(lambda: (s := kubectl.status("crash")).get("observedGeneration") == cr["metadata"]["generation"]
                      and s.get("phase") == "Progressing" and s, timeout=30, what="rollout after restart")
    time.sleep(1.5)  # let any write the killed process had in flight land
    children = kubectl.children("crash")
    assert sorted(children) == sorted(status["children"]), "exactly the planned children, no duplicates or extras"
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"] for o in children.values())
    assert all(o["metadata"]["labels"]["disagg.io/plan-hash"] == status["planHash"] for o in children.values())


def test_resource_deleted_while_operator_down(api, namespace, cluster, start_operator):
    kubectl = Kubectl(api, namespace)
    operator = start_operator()
    cr = kubectl.create("gone", small())
    wait_for(lambda: kubectl.status("gone").get("observedGeneration") == cr["metadata"]["generation"],
             what="rollout")
    assert kubectl.children("gone")
    operator.stop()

    kubectl.delete("gone")
    # Real clusters garbage-collect by owner reference; the emulator does not, so the restarted
    # operator's orphan sweep must remove them. Either way: no orphans once the operator is back.
    start_operator()
    wait_for(lambda: not kubectl.children("gone"), what="orphans removed")
