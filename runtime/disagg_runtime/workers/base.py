"""What both workers share: the engine thread, health and readiness, drain, stats and metrics routes."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..kv.links import ChannelChoice
from ..metrics import Role, WorkerMetrics, render
from .engine_thread import EngineThread
from .protocol import WorkerStats

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Limits and KV settings of a worker (the `disagg serve --role prefill|decode` flags)."""

    max_queue: int = 256
    prefill_token_budget: int = 4096
    max_batch: int = 256
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 4 << 20
    heartbeat_s: float = 1.0
    kv_port: int = 0
    kv_channel: ChannelChoice = "auto"
    kv_compression: str = "none"
    kv_timeout_s: float = 30.0
    kv_ttl_s: float = 120.0
    advertise_host: str | None = None
    drain_timeout_s: float = 300.0


class Worker(ABC):
    """An engine behind HTTP. Subclasses add their routes and the engine step."""

    role: Role

    def __init__(self, engine: Engine, config: WorkerConfig, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics.create(self.registry, self.role)
        self.thread = EngineThread(self._step, name=f"{self.role}-engine")
        self.draining = False
        self.drained = asyncio.Event()
        self.started = False

    # ---- subclass hooks -------------------------------------------------------------------------
    @abstractmethod
    def _step(self) -> bool:
        """One engine step on the engine thread; True if it did work."""

    @abstractmethod
    def _routes(self, app: web.Application) -> None:
        """Add the role's own routes."""

    @abstractmethod
    def _idle(self) -> bool:
        """No queued, running or parked work is left (drain may finish)."""

    @abstractmethod
    def _load(self) -> tuple[int, int, int]:
        """(queue depth, queued tokens, running) for stats and metrics."""

    @abstractmethod
    async def _on_start(self) -> None:
        """Start role-specific services (after the engine thread)."""

    @abstractmethod
    async def _on_stop(self) -> None:
        """Stop role-specific services."""

    # ---- app ------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/stats", self.stats_handler)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_post("/drain", self.drain_handler)
        self._routes(app)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()
        await self._on_start()
        self.started = True

    async def _cleanup(self, _app: web.Application) -> None:
        await self._on_stop()
        self.thread.stop()

    # ---- health, stats, drain -------------------------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        if not self.thread.alive:
            return web.json_response({"status": "engine thread stopped", "error": str(self.thread.error)},
                                     status=500)
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        ready = self.started and self.thread.alive and not self.draining
        return web.json_response({"ready": ready, "draining": self.draining}, status=200 if ready else 503)

    def stats(self) -> WorkerStats:
        queued, queued_tokens, running = self._load()
        free, total = self.engine.free_blocks, self.engine.total_blocks
        self.metrics.set_load(queued=queued, running=running, blocks_used=total - free, blocks_free=free)
        return WorkerStats(role=self.role, model_id=self.engine.model_id,
                           ready=self.started and self.thread.alive and not self.draining,
                           draining=self.draining, queue_depth=queued, queued_tokens=queued_tokens,
                           max_queue=self.config.max_queue, running=running, free_blocks=free, total_blocks=total,
                           block_size=self.engine.block_size, max_context=self.engine.max_context,
                           kv_port=self.kv_port)

    @property
    def kv_port(self) -> int | None:
        return None

    async def stats_handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.stats().model_dump_json(), content_type="application/json")

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        self.stats()  # refresh the load gauges at scrape time
        data, content_type = render(self.registry)
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def drain_handler(self, _request: web.Request) -> web.Response:
        self.start_drain()
        return web.json_response({"draining": True, "idle": self._idle()})

    def start_drain(self) -> None:
        """Stop taking new work; `drained` is set once in-flight work is done (or the timeout passes)."""
        if self.draining:
            return
        self.draining = True
        log.info("%s worker draining", self.role)
        asyncio.get_running_loop().create_task(self._wait_idle())

    async def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while not self._idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self._idle():
            log.warning("%s worker drain timed out with work left", self.role)
        self.drained.set()
