"""Rotating the internal token under traffic, with the operator's pods running as processes (node_agent.py
plays kubelet and the workload controllers; the Secret volume is refreshed as kubelet's sync does): the new
workers roll out beside the serving ones, the router re-reads the token in place, and no request fails."""

from __future__ import annotations

import base64
import time

import pytest

from .loop_harness import loop_rig, loop_spec, wait_until
from .podnet import PodNetwork
from .prometheus import prometheus_binary
from .traffic import Phase, PhasedLoad

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None, reason="needs the prometheus binary (apt install prometheus)"),
    pytest.mark.skipif(PodNetwork.unavailable_reason() is not None, reason=str(PodNetwork.unavailable_reason())),
]


@pytest.fixture
def rig(api, cluster, namespace, tmp_path):
    if cluster.real:
        pytest.skip("the node agent plays kubelet for the emulator; a real cluster runs its own")
    with loop_rig(api, cluster.kubeconfig, namespace, tmp_path) as rig:
        yield rig
        assert not rig.agent.errors, rig.agent.errors


def _tokens(rig, name: str) -> list[str]:
    secret = rig.kubectl.children(name)[f"Secret/{name}-internal-token"]
    return base64.b64decode(secret["data"]["tokens"]).decode().split()


def _worker_pods(rig) -> set[str]:
    with rig.agent._lock:
        return {n for n, t in rig.agent.pods.items() if t.owner[0] == "StatefulSet" and t.proc.ready}


def test_rotating_the_token_under_traffic_fails_no_request(rig, capsys):
    name = "rot"
    spec = loop_spec(2.0)
    spec["replan"] = {"enabled": False}
    rig.kubectl.create(name, spec)
    wait_until(lambda: rig.kubectl.status(name).get("phase") == "Ready", 180, "Ready")
    wait_until(lambda: rig.agent.ready_pods(f"{name}-router"), 60, "router pod ready")
    [old_token] = _tokens(rig, name)
    old_pods = _worker_pods(rig)
    with rig.agent.port_forward(name) as url:
        load = PhasedLoad(url, [Phase(duration_s=150, rate=2.0)]).start()
        time.sleep(5)
        rotated_at = time.time()
        cr = rig.kubectl.patch_spec(name, {"internalToken": {"rotation": 1}})
        generation = cr["metadata"]["generation"]
        wait_until(lambda: (s := rig.kubectl.status(name)).get("observedGeneration") == generation
                   and s.get("phase") == "Ready" and not s.get("retiring"), 140, "rotation rolled out")
        rolled_out = time.time()
        wait_until(lambda: not (_worker_pods(rig) & old_pods), 60, "old worker pods gone")
        records = load.join(timeout=240)
    new_token, previous = _tokens(rig, name)
    assert previous == old_token and new_token != old_token
    assert _worker_pods(rig) and not (_worker_pods(rig) & old_pods)
    assert rolled_out < load.t0 + load.duration_s, "the load ended before the rotation had rolled out"
    failed = [(r.status, r.error) for r in records if not r.ok]
    with capsys.disabled():
        print(f"\n[e2e] token rotation under traffic: {len(records)} requests, {len(failed)} failed, rolled out "
              f"{rolled_out - rotated_at:.0f} s after the rotation, {len(old_pods)} worker pods replaced")
    assert len(records) > 100 and failed == [], failed[:5]
