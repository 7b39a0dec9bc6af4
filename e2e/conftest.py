"""Fixtures: an API server (kmock emulator, or the cluster $KUBECONFIG names), a namespace per test,
and operators started in threads against it (see e2e/README.md)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from disagg_operator.crd import crd_manifest
from disagg_operator.handlers import OperatorContext
from disagg_operator.runner import OperatorConfig, run_operator

from .cluster import EmulatedCluster

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Cluster:
    """Where the tests run: a kubeconfig, plus the emulator when there is one."""

    kubeconfig: Path
    emulated: EmulatedCluster | None

    @property
    def real(self) -> bool:
        return self.emulated is None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    real = os.environ.get("KUBECONFIG")
    if real:
        path = Path(real.split(os.pathsep)[0]).expanduser()
        _install_crd(path)
        yield Cluster(kubeconfig=path, emulated=None)
        return
    emulated = EmulatedCluster().start()
    try:
        yield Cluster(kubeconfig=emulated.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config"),
                      emulated=emulated)
    finally:
        emulated.stop()


def _install_crd(kubeconfig: Path) -> None:
    api = kubernetes.config.new_client_from_config(str(kubeconfig), persist_config=False)
    ext = kubernetes.client.ApiextensionsV1Api(api)
    crd = crd_manifest()
    try:
        ext.create_custom_resource_definition(crd)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
        live = ext.read_custom_resource_definition(crd["metadata"]["name"])
        crd["metadata"]["resourceVersion"] = live.metadata.resource_version
        ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = ext.read_custom_resource_definition(crd["metadata"]["name"])
        if any(c.type == "Established" and c.status == "True" for c in (live.status.conditions or [])):
            return
        time.sleep(0.5)
    raise TimeoutError("the DisaggServing CRD did not become Established")


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(str(cluster.kubeconfig), persist_config=False)
    yield client
    client.close()


@pytest.fixture
def namespace(api: kubernetes.client.ApiClient, cluster: Cluster) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core = kubernetes.client.CoreV1Api(api)
    if cluster.real:  # the emulator has implicit namespaces (and cannot parse POST /api/v1/namespaces)
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    if cluster.real:
        core.delete_namespace(name)


@dataclass
class OperatorHandle:
    """An operator running in its own thread and event loop."""

    config: OperatorConfig
    thread: threading.Thread
    stop_flag: threading.Event
    ready_flag: threading.Event
    context: list[OperatorContext] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def ctx(self) -> OperatorContext:
        return self.context[0]

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise TimeoutError("the operator did not stop within 30 s")
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def start_operator(cluster: Cluster, namespace: str) -> Iterator[Callable[..., OperatorHandle]]:
    running: list[OperatorHandle] = []

    def start(**overrides: Any) -> OperatorHandle:
        plan_fn = overrides.pop("plan_fn", None)
        config = OperatorConfig(namespaces=(namespace,), kubeconfig=str(cluster.kubeconfig), plan_workers=1,
                                **overrides)
        handle = OperatorHandle(config=config, thread=threading.Thread(), stop_flag=threading.Event(),
                                ready_flag=threading.Event())

        def main() -> None:
            try:
                asyncio.run(run_operator(config, stop_flag=handle.stop_flag, ready_flag=handle.ready_flag,
                                         plan_fn=plan_fn, on_context=handle.context.append))
            except BaseException as exc:  # surfaced by stop(): a crashed operator fails the test
                handle.errors.append(exc)

        handle.thread = threading.Thread(target=main, name="operator", daemon=True)
        handle.thread.start()
        if not handle.ready_flag.wait(timeout=30):
            raise TimeoutError(f"the operator did not become ready: {handle.errors}")
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if handle.thread.is_alive():
            handle.stop()


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / "k8s" / f"disaggserving-{name}.yaml").read_text())


# ---- the serving path as processes (e2e/test_serving*.py) -------------------------------------------
async def complete(session, url: str, prompt, *, stream: bool, **extra) -> list[int]:
    """POST /v1/completions (16 greedy tokens) and return the generated token ids, streamed or not."""
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True, "stream": stream,
            **extra}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return (await resp.json())["choices"][0]["token_ids"]
        ids = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
        return ids


@dataclass
class LocalServe:
    """A `disagg serve --local` process: the line announcing it, and its exit code once stopped."""

    line: str
    code: int | None = None

    @property
    def url(self) -> str:
        return re.search(r"at (http://\S+)", self.line).group(1)


@contextmanager
def serve_local(args: list[str], cache_dir: Path) -> Iterator[LocalServe]:
    """Run `disagg serve --local *args` until it announces its URL; SIGTERM it (and wait) on the way out."""
    cmd = [sys.executable, "-m", "disagg_cli.main", "serve", "--local", *args, "--port", "0",
           "--cache-dir", str(cache_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    served = LocalServe(line="")
    try:
        deadline = time.monotonic() + 120
        while "serving" not in served.line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1)[0]:
                served.line = proc.stdout.readline()
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        served.code = proc.wait(30)
        proc.stdout.close()


def stream_hello(url: str) -> list[str]:
    """The SSE `data:` lines of a streamed 8-token completion of "Hello"."""
    body = json.dumps({"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]


def processes_serving(model_cache: Path) -> str:
    """`pgrep -f` of the processes still serving a model from `model_cache` (empty when none is left)."""
    return subprocess.run(["pgrep", "-f", f"model-path {model_cache}"], capture_output=True, text=True).stdout
