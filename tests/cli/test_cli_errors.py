"""Every CLI failure a user can cause is one clear line on stderr and exit 2, promptly: no traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml
from disagg_planner.workloads import SimRequest
from disagg_runtime.benchclient.client import ServerUnreachable, run_trace


def disagg(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "disagg_cli.main", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return out, time.monotonic() - t0


def one_line(out: subprocess.CompletedProcess, prefix: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_operator_without_a_kubeconfig(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config either
    line = one_line(disagg("operator", env=env)[0], "disagg operator: no usable Kubernetes configuration")
    assert "--kubeconfig" in line
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [\n")
    one_line(disagg("operator", "--kubeconfig", str(broken), env=env)[0], "disagg operator:")


def test_serve_local_on_a_busy_port_fails_before_starting_anything(busy_port, tmp_path):
    out, took = disagg("serve", "--local", "--port", str(busy_port), "--cache-dir", str(tmp_path))
    assert "already in use" in one_line(out, "disagg serve:") and took < 30
    assert not (tmp_path / "models").exists()  # refused before the model was even written


def test_serve_role_on_a_busy_port(busy_port):
    out, _ = disagg("serve", "--role", "router", "--host", "127.0.0.1", "--port", str(busy_port),
                    "--colocated-endpoints", "127.0.0.1:9")
    assert f"port {busy_port}" in one_line(out, "disagg serve:")


def test_bench_against_a_dead_url_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out, took = disagg("bench", "--url", f"http://127.0.0.1:{dead}", "--rate", "0.5", "--num-requests", "50",
                       "--ttft-slo", "1", "--tpot-slo", "0.1", "--out", str(tmp_path / "b"))
    assert "cannot reach" in one_line(out, "disagg bench:") and took < 30  # not the 100 s schedule
    out, _ = disagg("bench", "--url", "localhost:8000", "--rate", "1", "--ttft-slo", "1", "--tpot-slo", "0.1",
                    "--out", str(tmp_path / "b"))
    one_line(out, "disagg bench: --url must start with http://")


def test_a_run_stops_after_a_few_refused_connections_instead_of_playing_its_schedule():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    trace = [SimRequest(arrival=0.2 * i, input_len=8, output_len=4) for i in range(200)]  # a 40 s schedule
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="refused 3 connections in a row"):
        asyncio.run(run_trace(f"http://127.0.0.1:{dead}", trace, model=None))
    assert time.monotonic() - t0 < 10


SPEC = {"model": {"preset": "opt-13b"}, "cluster": {"nodes": 1, "gpusPerNode": 4},
        "slo": {"ttftMs": 250, "tpotMs": 100}}


def test_plan_exits_2_for_an_unmet_target_and_prints_the_plan(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "workload": {"rate": 1000, "dataset": "chatbot"}}))
    out, _ = disagg("plan", str(path), "--json", "--workers", "1")
    assert "target not met" in one_line(out, "disagg plan:") and '"goodputRps"' in out.stdout


def test_plan_exits_2_past_its_deadline(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "cluster": {"nodes": 4096, "gpusPerNode": 64},
                                    "workload": {"rate": 1e6, "dataset": "chatbot"}}))
    out, took = disagg("plan", str(path), "--workers", "1", "--deadline", "2")
    assert "2s deadline" in one_line(out, "disagg plan:") and took < 30


@pytest.mark.parametrize("spec,field", [
    ({**SPEC, "cluster": {"nodes": 1, "gpusPerNode": 4, "gpuType": None}, "workload": {"rate": 1}},
     "cluster"),
    ({**SPEC, "workload": {"rate": 1e-300}}, "workload.rate"),
])
def test_plan_refuses_specs_it_cannot_use_naming_the_field(tmp_path, spec, field):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, _ = disagg("plan", str(path), "--workers", "1")
    assert out.returncode == 2 and field in out.stderr and "Traceback" not in out.stderr
