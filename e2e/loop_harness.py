"""The whole loop on one machine: API emulator + operator + node agent + Prometheus + traffic.

Used by e2e/test_control_loop.py (short scenarios, CI) and bench/control_loop.py (the long ones). A
`LoopRig` starts the node agent on a namespace, a real Prometheus that scrapes the agent's pods through
file-based discovery with the `kubernetes-pods` relabelling, and an operator (in a thread) whose
telemetry reads that Prometheus. The DisaggServing it serves is a tiny random Llama on CPU with a
synthetic latency profile (`tiny_profile`), so the planner's arithmetic, not this machine's speed,
decides how many instances a rate needs: that is what lets a short test see a re-plan.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from disagg_operator.runner import OperatorConfig, run_operator
from disagg_planner.api import MODEL_PRESETS, LatencyProfile, ShapeProfile
from disagg_planner.api.profile import DecodeSample, PrefillSample

from .conftest import wait_for
from .kubectl import Kubectl
from .node_agent import NodeAgent
from .pod_scrape import kubernetes_pods_job
from .prometheus import PrometheusServer

PROFILE_CONFIG_MAP = "tiny-profile"


def tiny_profile(*, prefill_fixed_s: float = 0.05, prefill_per_token_s: float = 2e-3,
                 decode_fixed_s: float = 0.02, decode_per_seq_s: float = 0.01, tp2: bool = False) -> LatencyProfile:
    """A latency profile of the tiny-llama preset on the `CPU` GPU type: prefill costs
    `prefill_fixed_s + prefill_per_token_s * tokens`, a decode step `decode_fixed_s + decode_per_seq_s * batch`.
    With the defaults one decode instance holds a TPOT of 150 ms up to about 5 req/s of 16-token outputs."""
    prefill = [PrefillSample(batch_size=b, sum_tokens=b * n, sum_sq_tokens=b * n * n,
                             seconds=prefill_fixed_s + prefill_per_token_s * b * n)
               for n in (16, 64, 256, 1024) for b in (1, 4)]
    decode = [DecodeSample(batch_size=b, sum_context=b * 64, seconds=decode_fixed_s + decode_per_seq_s * b)
              for b in (1, 2, 4, 8, 16, 32)]
    shapes = [ShapeProfile(prefill=prefill, decode=decode)]
    if tp2:
        # tp=2: a prefill takes 0.55x as long (per GPU, 1.1x the work) and a decode step 0.8x: worth its second
        # GPU only where TTFT binds, which long prompts make it do.
        shapes.append(ShapeProfile(tp=2, prefill=[p.model_copy(update={"seconds": 0.55 * p.seconds}) for p in prefill],
                                   decode=[d.model_copy(update={"seconds": 0.8 * d.seconds}) for d in decode]))
    return LatencyProfile(model=MODEL_PRESETS["tiny-llama"], gpu="CPU", shapes=shapes,
                          created=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc))


def histogram(low: int, high: int) -> dict[str, Any]:
    """Lengths uniform in [low, high)."""
    return {"edges": [low, high], "counts": [1.0]}


def loop_spec(rate: float, *, input_lengths: tuple[int, int] = (16, 48), output_lengths: tuple[int, int] = (16, 17),
              interval_s: int = 4, window_s: int = 8, **extra: Any) -> dict[str, Any]:
    """The DisaggServing these scenarios serve: tiny-llama on a CPU "cluster", re-planned every `interval_s`."""
    spec = {
        "model": {"preset": "tiny-llama"},
        "cluster": {"nodes": 1, "gpusPerNode": 16, "gpuType": "CPU"},
        "workload": {"rate": rate, "dataset": None, "inputLengths": histogram(*input_lengths),
                     "outputLengths": histogram(*output_lengths)},
        "slo": {"ttftMs": 1000, "tpotMs": 150},
        # The profile is synthetic, not what these CPU pods do: under it `auto` would pick colocated
        # workers, which on this machine saturate near 4.4 req/s, and telemetry counts finished requests
        # as arrivals, so a 3x step would not show. The mode choice has its own e2e (test_mode_switch.py).
        "mode": "disaggregated",
        "search": {"maxTp": 1, "maxPp": 1},
        "runtime": {"image": "local/disagg-runtime:e2e"},
        "replan": {"enabled": True, "intervalSeconds": interval_s, "windowSeconds": window_s, "rateChange": 0.5,
                   "lengthChange": 0.5, "stableIntervals": 2},
        "profile": {"configMapRef": {"name": PROFILE_CONFIG_MAP}},
    }
    spec.update(extra)
    return spec


def image_env(home: Path) -> dict[str, str]:
    """The 'image' every container runs: this checkout's interpreter, packages and executables."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = {"PATH": path, "HOME": str(home), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


@dataclass
class LoopRig:
    """Everything but the API server, for one namespace; `close` stops it all."""

    api: kubernetes.client.ApiClient
    kubeconfig: Path
    namespace: str
    workdir: Path
    replan_tick_s: float = 0.5
    profile: LatencyProfile = field(default_factory=tiny_profile)
    agent: NodeAgent | None = None
    prom: PrometheusServer | None = None
    kubectl: Kubectl | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    operator_errors: list[BaseException] = field(default_factory=list)

    def start(self) -> LoopRig:
        home = self.workdir / "image-home"
        home.mkdir(parents=True, exist_ok=True)
        self.agent = NodeAgent(self.api, self.namespace, image_env(home)).start()
        self.prom = PrometheusServer([], interval_s=1.0,
                                     scrape_configs=[kubernetes_pods_job(str(self.agent.sd_file))]).start()
        self.kubectl = Kubectl(self.api, self.namespace)
        self.kubectl.put_config_map(PROFILE_CONFIG_MAP, {"profile.json": self.profile.model_dump_json(by_alias=True)})
        ready = threading.Event()
        config = OperatorConfig(namespaces=(self.namespace,), kubeconfig=str(self.kubeconfig), plan_workers=1,
                                prometheus_url=self.prom.url, replan_tick=self.replan_tick_s)

        def main() -> None:
            try:
                asyncio.run(run_operator(config, stop_flag=self._stop, ready_flag=ready))
            except BaseException as exc:  # surfaced by close()
                self.operator_errors.append(exc)

        self._thread = threading.Thread(target=main, name="operator", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise TimeoutError(f"the operator did not start: {self.operator_errors}")
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.prom is not None:
            self.prom.stop()
        if self.agent is not None:
            self.agent.stop()

    def workers(self) -> dict[str, int]:
        """Ready worker pods per phase (prefill, decode, colocated), from the node's view."""
        assert self.agent is not None
        out: dict[str, int] = {}
        with self.agent._lock:
            for t in self.agent.pods.values():
                phase = (t.proc.pod["metadata"].get("labels") or {}).get("disagg.io/phase", "")
                if phase != "router" and t.proc.ready:
                    out[phase] = out.get(phase, 0) + 1
        return out


@contextmanager
def loop_rig(api: kubernetes.client.ApiClient, kubeconfig: Path, namespace: str, workdir: Path,
             **kw: Any) -> Iterator[LoopRig]:
    rig = LoopRig(api, kubeconfig, namespace, workdir, **kw)
    try:
        yield rig.start()
    finally:
        rig.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """conftest's `wait_for`, positionally (what the scenarios read best as)."""
    return wait_for(predicate, timeout=timeout, interval=interval, what=what)
