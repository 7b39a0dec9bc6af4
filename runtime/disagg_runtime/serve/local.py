"""`disagg serve --local`: router + prefill + decode workers as child processes on this machine.

With `--colocated`, router + colocated workers instead (the vLLM-style baseline, same model and flags).
Workers start first on free ports and announce them on stdout; the router is then pointed at them.
Each child is a `python -m disagg_runtime.serve --role ...` process, exactly what a pod runs. They share
an internal token (a fresh one in a private temporary file unless `--internal-token-file` names one), so
the workers' ports refuse anyone but this router, as in a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .model_cache import tiny_model
from .options import ServeError, check_port_free

_WORKER_FLAGS = ("--device", "--dtype", "--block-size", "--num-kv-blocks", "--kv-memory-fraction", "--kv-watermark",
                 "--preemption", "--swap-space-gib", "--overlap-decode", "--kv-channel",
                 "--kv-compression", "--kv-timeout", "--prefill-token-budget", "--max-queue", "--max-batch",
                 "--max-prompt-tokens", "--max-body-bytes", "--body-timeout", "--collective-timeout", "--log-level",
                 "--colocated-prefill", "--chunk-token-budget")
_ROUTER_FLAGS = ("--max-in-flight", "--max-body-bytes", "--heartbeat-timeout", "--served-model-name",
                 "--api-key-file", "--connect-timeout", "--response-timeout", "--body-timeout", "--log-level")


def _forward(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            out += [flag, str(value)]
    return out


@dataclass
class LocalCluster:
    """Child processes of one local deployment; `start()` returns the router URL.

    With `colocated_workers` > 0 the deployment is that many colocated workers and no prefill or decode
    workers (the baseline to compare against).
    """

    model_dir: Path
    port: int = 8000
    host: str = "127.0.0.1"
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0
    worker_args: list[str] = field(default_factory=list)
    # Per role ("decode"), then per instance ("decode-1"), after worker_args (e.g. --device, --tp).
    role_args: dict[str, list[str]] = field(default_factory=dict)
    router_args: list[str] = field(default_factory=list)
    internal_token_file: str | None = None  # None: a fresh token, removed again by stop()
    startup_timeout_s: float = 120.0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _own_token: str | None = None

    @property
    def token_file(self) -> str | None:
        """The internal token's file the processes share (None before `start`): what another process
        joining this deployment (a second router, say) passes as --internal-token-file."""
        return self.internal_token_file or self._own_token

    def _token_file(self) -> str:
        if self.internal_token_file is not None:
            return self.internal_token_file
        fd, path = tempfile.mkstemp(prefix="disagg-token-")  # mode 0600: only this user's processes read it
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        self._own_token = path
        return path

    def _spawn(self, name: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "disagg_runtime.serve", *args]
        # stdout carries one announcement line; logs go to our stderr.
        self.processes[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def _announced_port(self, name: str, deadline: float) -> int:
        proc = self.processes[name]
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                if line:
                    return int(json.loads(line)["port"])
            if proc.poll() is not None:
                raise ServeError(f"{name} exited with code {proc.returncode} while starting (its log is above)")
        raise ServeError(f"{name} did not start within {self.startup_timeout_s:.0f}s")

    def start(self) -> str:
        """Start every process and wait until the router is ready; returns its base URL."""
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            token = ["--internal-token-file", self._token_file()]
            common = ["--model-path", str(self.model_dir), "--host", self.host, "--port", "0", *token,
                      *self.worker_args]
            for role, count in self.worker_counts.items():
                for i in range(count):
                    self._spawn(f"{role}-{i}", ["--role", role, *common, *self.role_args.get(role, []),
                                                *self.role_args.get(f"{role}-{i}", [])])
            for name in list(self.processes):
                self.ports[name] = self._announced_port(name, deadline)
            endpoints: list[str] = []
            for role in self.worker_counts:
                listed = ",".join(f"{self.host}:{p}" for n, p in self.ports.items() if n.startswith(f"{role}-"))
                endpoints += [f"--{role}-endpoints", listed]
            self._spawn("router", ["--role", "router", "--host", self.host, "--port", str(self.port),
                                   "--model-path", str(self.model_dir), *endpoints, *token, *self.router_args])
            self.ports["router"] = self._announced_port("router", deadline)
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self.url

    @property
    def worker_counts(self) -> dict[str, int]:
        """Workers to start, by role."""
        if self.colocated_workers:
            return {"colocated": self.colocated_workers}
        return {"prefill": self.prefill_workers, "decode": self.decode_workers}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.ports['router']}"

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.processes["router"].poll() is not None:
                raise ServeError("the router exited while starting (its log is above)")
            time.sleep(0.1)
        raise ServeError(f"the router did not see ready workers within {self.startup_timeout_s:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process (workers drain), then SIGKILL whatever is left after `timeout`."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._own_token is not None:
            os.unlink(self._own_token)
            self._own_token = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parallel_role_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """--tp/--pp of each role from --prefill-tp, --prefill-pp, --decode-tp, --decode-pp."""
    out: dict[str, list[str]] = {}
    for role in ("prefill", "decode"):
        tp, pp = getattr(args, f"{role}_tp", 1), getattr(args, f"{role}_pp", 1)
        if tp * pp > 1:
            out[role] = ["--tp", str(tp), "--pp", str(pp)]
    return out


class _Stop(Exception):
    """SIGTERM or SIGHUP reached the launcher."""


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _Stop


def run_local(args: argparse.Namespace) -> int:
    """Start a local deployment, print its URL and a curl line, serve until Ctrl-C or SIGTERM."""
    # Without this a SIGTERM would kill the launcher and orphan its children.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    check_port_free(args.host or "127.0.0.1", args.port)  # before minutes of model loading, not after
    model_dir = Path(args.model_path) if args.model_path else tiny_model(args.cache_dir)
    worker_args = _forward(args, _WORKER_FLAGS)
    router_args = _forward(args, _ROUTER_FLAGS) + (["--metrics-require-key"] if args.metrics_require_key else [])
    cluster = LocalCluster(model_dir=model_dir, port=args.port, host=args.host or "127.0.0.1",
                           prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                           colocated_workers=args.colocated_workers if args.colocated else 0,
                           worker_args=worker_args, router_args=router_args,
                           role_args=parallel_role_args(args), internal_token_file=args.internal_token_file)
    try:
        url = cluster.start()
    except (KeyboardInterrupt, _Stop):
        return 0
    workers = " + ".join(f"{n} {role}" for role, n in cluster.worker_counts.items())
    print(f"disagg: serving {model_dir} at {url}  (router + {workers}; Ctrl-C stops)", flush=True)
    auth = " -H 'Authorization: Bearer KEY'" if args.api_key_file else ""
    print(f"  curl -N {url}/v1/completions{auth} -H 'Content-Type: application/json' "
          """-d '{"prompt": "Hello", "max_tokens": 32, "stream": true}'""", flush=True)
    try:
        while all(p.poll() is None for p in cluster.processes.values()):
            time.sleep(0.5)
        dead = [n for n, p in cluster.processes.items() if p.poll() is not None]
        print(f"disagg: {', '.join(dead)} exited; stopping", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        cluster.stop()
