"""The router's view of its workers: polled load, health, and the choice of instance per request.

Prefill: the instance with the shortest queue (requests, then tokens). Decode: the instance with the
most free KV blocks. A colocated instance runs both phases, so it competes with prefill instances for a
request's entry (shortest queue) and the request never goes to a decode instance. Between polls the
router counts what it dispatched itself, so a burst does not pile onto the instance that looked best at
the last poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
from pydantic import ValidationError

from ..workers.protocol import WorkerStats
from .resolve import EndpointResolver, split_endpoint

log = logging.getLogger(__name__)
Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")


class NoCapacity(Exception):
    """Every instance of a role is at its queue limit (answer 429 with Retry-After)."""

    def __init__(self, role: str, retry_after: int = 1) -> None:
        super().__init__(f"all {role} instances are at their queue limit; retry in {retry_after}s")
        self.role = role
        self.retry_after = retry_after


class NoWorkers(Exception):
    """No healthy, ready instance of a role (answer 503); `role` may name alternatives ("prefill or colocated")."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} instance is ready")
        self.role = role


@dataclass
class Worker:
    """One instance as last polled."""

    role: Role
    url: str
    stats: WorkerStats | None = None
    healthy: bool = False
    failures: int = 0
    dispatched: int = 0  # requests sent since the last poll
    dispatched_blocks: int = 0
    outstanding: int = 0  # requests the router is waiting on right now
    last_ok: float = field(default=0.0)

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")

    @property
    def usable(self) -> bool:
        return self.healthy and self.stats is not None and self.stats.ready and not self.stats.draining


def read_endpoints(path: str | Path) -> dict[Role, list[str]]:
    """{"prefill": [...], "decode": [...]} (plus "colocated" when listed) from the operator's endpoints.json.

    Entries are URLs or host:port.
    """
    doc = json.loads(Path(path).read_text())
    out: dict[Role, list[str]] = {"prefill": [], "decode": []}
    if "colocated" in doc:
        out["colocated"] = []
    for role in out:
        for endpoint in doc.get(role, []):
            split_endpoint(endpoint)
            out[role].append(str(endpoint))
    return out


class WorkerPool:
    """Polls `/stats` of every endpoint; DNS names are re-resolved each poll (headless services), and a
    slow lookup delays no poll (resolve.py).

    With `endpoints_file` (the operator's ConfigMap) the endpoint list is re-read every poll too, so a
    re-plan that adds or removes instances reaches the router without a restart.
    """

    def __init__(self, session: aiohttp.ClientSession, *, prefill: list[str], decode: list[str],
                 colocated: Sequence[str] = (), endpoints_file: str | None = None, poll_s: float = 0.5,
                 poll_timeout_s: float = 2.0, resolver: EndpointResolver | None = None) -> None:
        for e in [*prefill, *decode, *colocated]:
            split_endpoint(e)
        self.session = session
        self.static: dict[Role, list[str]] = {"prefill": list(prefill), "decode": list(decode),
                                              "colocated": list(colocated)}
        self.endpoints: dict[Role, list[str]] = {role: list(eps) for role, eps in self.static.items()}
        self.endpoints_file = endpoints_file
        self.workers: dict[str, Worker] = {}
        self.poll_s = poll_s
        self.poll_timeout_s = poll_timeout_s
        self.resolver = resolver or EndpointResolver(wait_s=min(1.0, poll_timeout_s))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.resolver.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:  # a poll failure must never stop polling
                log.exception("worker poll failed")

    async def _reload(self) -> None:
        if self.endpoints_file is None:
            return
        try:
            listed = await asyncio.to_thread(read_endpoints, self.endpoints_file)
        except (OSError, ValueError, AttributeError) as e:
            log.warning("keeping the last endpoints: cannot read %s: %s", self.endpoints_file, e)
            return
        self.endpoints = {role: static + [e for e in listed.get(role, []) if e not in static]
                          for role, static in self.static.items()}

    async def refresh(self) -> None:
        """Re-read the endpoint list, resolve it, and poll every worker once."""
        await self._reload()
        resolved = await self.resolver.resolve_all(e for eps in self.endpoints.values() for e in eps)
        seen: set[str] = set()
        for role, endpoints in self.endpoints.items():
            for endpoint in endpoints:
                for url in resolved[endpoint]:
                    seen.add(url)
                    self.workers.setdefault(url, Worker(role=role, url=url))
        for url in list(self.workers):
            if url not in seen:
                del self.workers[url]
        await asyncio.gather(*(self._poll(w) for w in self.workers.values()))

    async def _poll(self, worker: Worker) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.poll_timeout_s)
            async with self.session.get(f"{worker.url}/stats", timeout=timeout) as resp:
                resp.raise_for_status()
                worker.stats = WorkerStats.model_validate_json(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValidationError, OSError) as e:
            if worker.healthy:
                log.warning("%s worker %s is unreachable: %s", worker.role, worker.url, e)
            worker.healthy = False
            worker.failures += 1
            return
        worker.healthy = True
        worker.failures = 0
        worker.last_ok = time.monotonic()
        worker.dispatched = 0
        worker.dispatched_blocks = 0

    def mark_failed(self, worker: Worker) -> None:
        """A request to `worker` failed at the connection level: stop choosing it until it polls healthy."""
        worker.healthy = False
        worker.failures += 1

    def of(self, role: Role) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role]

    def ready(self, role: Role) -> list[Worker]:
        return [w for w in self.of(role) if w.usable]

    @property
    def model_id(self) -> str | None:
        return next((w.stats.model_id for w in self.workers.values() if w.stats is not None), None)

    @property
    def max_context(self) -> int | None:
        contexts = [w.stats.max_context for w in self.workers.values() if w.stats is not None]
        return min(contexts) if contexts else None

    @property
    def ready_to_serve(self) -> bool:
        """A request can be served end to end: a colocated instance, or a prefill and a decode instance."""
        return bool(self.ready("colocated")) or bool(self.ready("prefill") and self.ready("decode"))

    def not_ready_reason(self) -> str:
        """Why `ready_to_serve` is False, naming the missing role."""
        if self.ready("prefill") and not self.ready("decode"):
            return "no decode instance is ready, so a request could not finish; retry shortly"
        if self.ready("decode") and not self.ready("prefill"):
            return "no prefill instance is ready; retry shortly"
        return "no worker instance is ready; retry shortly"

    def pick_prefill(self) -> Worker:
        """Shortest queue among ready prefill instances with room; NoWorkers / NoCapacity otherwise."""
        return self._shortest_queue(self.ready("prefill"), "prefill")

    def pick_entry(self, exclude: set[str] = frozenset()) -> Worker:
        """Where a request starts: shortest queue among ready prefill and colocated instances with room."""
        # A prefill instance is only a start when some decode instance can take the request after it.
        prefill = self.ready("prefill") if self.ready("decode") else []
        ready = [w for w in prefill + self.ready("colocated") if w.url not in exclude]
        roles = " or ".join(r for r in ("prefill", "colocated") if self.of(r)) or "prefill"
        return self._shortest_queue(ready, roles)

    @staticmethod
    def _shortest_queue(ready: list[Worker], what: str) -> Worker:
        if not ready:
            raise NoWorkers(what)
        open_ = [w for w in ready if w.stats.queue_depth + w.dispatched < w.stats.max_queue]
        if not open_:
            raise NoCapacity(what)
        best = min(open_, key=lambda w: (w.stats.queue_depth + w.dispatched, w.stats.queued_tokens))
        best.dispatched += 1
        return best

    def pick_decode(self, tokens: int, exclude: set[str] = frozenset()) -> Worker:
        """Most free KV among ready decode instances whose wait queue has room."""
        ready = [w for w in self.ready("decode") if w.url not in exclude]
        if not ready:
            raise NoWorkers("decode")
        open_ = [w for w in ready if w.stats.queue_depth + w.dispatched < w.stats.max_queue]
        if not open_:
            raise NoCapacity("decode")
        best = max(open_, key=lambda w: w.stats.free_blocks - w.dispatched_blocks)
        best.dispatched += 1
        best.dispatched_blocks += math.ceil(tokens / max(best.stats.block_size, 1))
        return best
