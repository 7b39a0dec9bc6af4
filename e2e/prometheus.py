"""A real Prometheus server for end-to-end tests: free port, temporary config and data, 1 s scrapes.

    with PrometheusServer([ScrapeTarget("127.0.0.1:8000", {"namespace": "prod"})]) as prom:
        prom.wait_for_scrapes(2)
        ... query prom.url ...

Target labels stand in for the relabelling a Kubernetes scrape job does (pod labels -> target labels).
The binary defaults to /usr/bin/prometheus (Debian's package); `prometheus_binary()` is None when it
is missing, so tests can skip with a reason.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

DEFAULT_BINARY = "/usr/bin/prometheus"
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


class PrometheusStartError(RuntimeError):
    """The server did not become ready; the message carries the tail of its log."""


def prometheus_binary(path: str = DEFAULT_BINARY) -> str | None:
    """The Prometheus executable, or None when it is not installed."""
    if Path(path).is_file():
        return path
    return shutil.which("prometheus")


@dataclass(frozen=True)
class ScrapeTarget:
    """One `host:port` serving /metrics, with the target labels Prometheus adds to its series."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """Starts `prometheus` on 127.0.0.1 scraping `targets` every `interval_s`; `stop` ends it."""

    def __init__(self, targets: Sequence[ScrapeTarget], *, interval_s: float = 1.0, binary: str | None = None,
                 ready_timeout_s: float = 20.0, scrape_configs: Sequence[dict] = ()) -> None:
        found = binary or prometheus_binary()
        if found is None:
            raise FileNotFoundError(f"no Prometheus binary at {DEFAULT_BINARY} or on PATH (apt install prometheus)")
        self._binary = found
        self._targets = list(targets)
        self._scrape_configs = list(scrape_configs)  # jobs of their own (file_sd over the node agent's pods)
        self._interval = interval_s
        self._ready_timeout = ready_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        interval = f"{round(self._interval * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [{
                "job_name": f"target{i}",
                "static_configs": [{"targets": [t.address], "labels": dict(t.labels)}],
            } for i, t in enumerate(self._targets)] + self._scrape_configs,
        }

    def start(self, attempts: int = 3) -> PrometheusServer:
        self._dir = Path(tempfile.mkdtemp(prefix="disagg-prometheus-"))
        (self._dir / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        for attempt in range(attempts):
            self.port = free_port()  # another process may take it before Prometheus binds: then retry
            log = (self._dir / "prometheus.log").open("wb")
            self._proc = subprocess.Popen(
                [self._binary, f"--config.file={self._dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self._dir / f'data{attempt}'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if self._wait_ready():
                return self
            self._terminate()
        tail = (self._dir / "prometheus.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise PrometheusStartError(f"Prometheus did not become ready after {attempts} attempts:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as r:
            return json.loads(r.read())

    def wait_for_scrapes(self, count: int = 1, timeout_s: float = 15.0) -> float:
        """Block until every target was scraped healthy `count` times from now; returns the last scrape time."""
        start = time.time()
        deadline = time.monotonic() + timeout_s
        seen: dict[str, list[float]] = {}
        while time.monotonic() < deadline:
            active = self.api("/api/v1/targets?state=active")["data"]["activeTargets"]
            for t in active:
                if t.get("health") == "up":
                    stamp = _parse_time(t["lastScrape"])
                    times = seen.setdefault(t["scrapeUrl"], [])
                    if stamp >= start and (not times or stamp > times[-1]):
                        times.append(stamp)
            if len(active) == len(self._targets) and len(seen) == len(self._targets) and all(
                    len(v) >= count for v in seen.values()):
                return max(v[-1] for v in seen.values())
            time.sleep(0.1)
        raise TimeoutError(f"targets not scraped {count} times in {timeout_s} s: {self.api('/api/v1/targets')}")

    def stop(self) -> None:
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _terminate(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_time(text: str) -> float:
    """RFC 3339 with Prometheus' nanosecond fractions (datetime takes at most microseconds)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    date, frac, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{date}.{(frac or '0')[:6]:0<6}{zone}").timestamp()
