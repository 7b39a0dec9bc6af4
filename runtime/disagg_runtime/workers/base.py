"""What every worker shares: the engine thread, health and readiness, drain, stats and metrics routes,
/abort, prompt and sampling checks, the timed prefill batch and the NDJSON stream that aborts on hang-up."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from ..engine import GenerationRequest, InvalidRequest, RequestTooLarge, SamplingParams, StepOutput
from ..kv.links import ChannelChoice
from ..metrics import Role, WorkerMetrics, render
from ..security.http_auth import internal_auth_middleware
from ..security.tokens import InternalToken
from .body import BodyLimits
from .engine_thread import EngineThread
from .errors import json_errors
from .http import BadRequest, error_response, stream_ndjson
from .protocol import PrefillRequest, WorkerStats
from .step_trace import StepKind, StepTrace

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
    # Above the router's own limit: its messages carry the prompt re-encoded, and decode's its token ids too.
    max_body_bytes: int = 32 << 20
    body_timeout_s: float = 60.0
    heartbeat_s: float = 1.0
    kv_port: int = 0
    kv_channel: ChannelChoice = "auto"
    kv_compression: str = "none"
    kv_timeout_s: float = 30.0
    kv_ttl_s: float = 120.0
    advertise_host: str | None = None
    drain_timeout_s: float = 300.0
    colocated_prefill: Literal["priority", "chunked"] = "priority"  # colocated workers' scheduler
    chunk_token_budget: int = 512  # chunked: tokens per mixed step, decode tokens included
    internal_token_file: str | None = None  # every route but probes and /metrics, and the KV links, need it
    step_trace_dir: str | None = None  # one JSON line per engine step there (workers/step_trace.py)


class Worker(ABC):
    """An engine behind HTTP. Subclasses add their routes and the engine step."""

    role: Role

    def __init__(self, engine: Engine, config: WorkerConfig, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.token = InternalToken.from_file(config.internal_token_file) if config.internal_token_file else None
        self.metrics = WorkerMetrics.create(self.registry, self.role)
        self.thread = EngineThread(self._step, name=f"{self.role}-engine")
        self.step_trace = StepTrace.in_dir(config.step_trace_dir, self.role) if config.step_trace_dir else None
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

    @abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free what it holds; False if unknown or done."""

    # ---- app ------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes + 1, middlewares=[json_errors])
        if self.token is not None:
            app.middlewares.append(internal_auth_middleware(self.token))
            self.token.source.attach(app)
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
        if self.step_trace is not None:
            self.step_trace.close()

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
        self.metrics.set_preempted(self.engine.num_preempted)
        return WorkerStats(role=self.role, model_id=self.engine.model_id,
                           ready=self.started and self.thread.alive and not self.draining,
                           draining=self.draining, queue_depth=queued, queued_tokens=queued_tokens,
                           max_queue=self.config.max_queue, running=running, free_blocks=free, total_blocks=total,
                           block_size=self.engine.block_size, max_context=self.engine.max_context,
                           kv_port=self.kv_port)

    @property
    def body_limits(self) -> BodyLimits:
        return BodyLimits(max_bytes=self.config.max_body_bytes, idle_timeout_s=self.config.body_timeout_s,
                          total_timeout_s=4 * self.config.body_timeout_s)

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

    # ---- requests: abort, checks, prefill batches, streams -------------------------------------
    async def abort_handler(self, request: web.Request) -> web.Response:
        try:
            rid = str((await request.json())["request_id"])
        except (ValueError, KeyError, TypeError):
            return error_response(400, "body must be {\"request_id\": \"...\"}")
        return web.json_response({"aborted": await self.abort(rid)})

    async def _tokenize(self, msg: PrefillRequest) -> list[int]:
        if msg.prompt_ids is not None:
            return list(msg.prompt_ids)
        return await asyncio.to_thread(self.engine.tokenizer.encode, msg.prompt)

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        """BadRequest unless the prompt is non-empty, within `max_prompt_tokens` and in the vocabulary."""
        limit = self.config.max_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            raise BadRequest(f"prompt has {len(prompt_ids)} tokens; this deployment accepts at most {limit}")
        if not prompt_ids:
            raise BadRequest("prompt is empty")
        vocab = self.engine.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise BadRequest(f"prompt token ids must be in [0, {vocab})")

    def _check_sampling(self, prompt_tokens: int, params: SamplingParams) -> None:
        """BadRequest unless `params` are valid and the request fits this engine's context and memory."""
        try:
            params.validate()
            self.engine.check_admissible(prompt_tokens, params.max_tokens)
        except (InvalidRequest, RequestTooLarge) as e:
            raise BadRequest(str(e)) from e

    def _prefill_batch(self, requests: list[GenerationRequest], *, reserve_decode: bool,
                       on_error: Callable[[Exception], None],
                       on_decoded: Callable[[list[StepOutput]], None] | None = None,
                       overlapped: bool = False) -> list[StepOutput] | None:
        """Prefill on the engine thread and free the KV of requests done at their first token.

        On an engine error the batch's requests fail (`on_error`), the worker goes on, and None is returned.
        `on_decoded` gets the tokens of a step in flight, during the prefill; `overlapped` leaves this
        prefill's first tokens in flight, for the next decode step to return (`Engine.prefill`).
        """
        start = time.perf_counter()
        try:
            outputs = self.engine.prefill(requests, reserve_decode=reserve_decode, on_decoded=on_decoded,
                                          overlapped=overlapped)
        except Exception as e:  # noqa: BLE001 - the batch's requests fail; the worker goes on
            log.exception("prefill batch of %d failed", len(requests))
            on_error(e)
            return None
        lens = [len(r.prompt_ids) for r in requests]
        self._stepped("prefill", start, batch=len(lens), tokens=sum(lens), sum_sq=sum(n * n for n in lens))
        for out in outputs:
            if out.finished:  # done at its first token: free its KV now, nothing will decode or pull it
                self.engine.release(out.request_id)
        return outputs

    def _stepped(self, kind: StepKind, start: float, *, batch: int, tokens: int, sum_sq: int = 0,
                 context: int = 0) -> None:
        """Account one engine step that began at perf_counter() `start`: the metrics, and the trace if on."""
        seconds = time.perf_counter() - start
        self.metrics.stepped(seconds=seconds, tokens=tokens)
        if self.step_trace is not None:
            self.step_trace.record(kind, start, seconds, batch=batch, tokens=tokens, sum_sq=sum_sq, context=context)

    def _traced_context(self) -> int:
        """The decode context the step trace records; not summed (O(batch)) when no trace is written."""
        return self.engine.decode_context if self.step_trace is not None else 0

    async def _stream(self, request: web.Request, events: AsyncIterator[BaseModel], request_id: str,
                      open_: Callable[[], bool]) -> web.StreamResponse:
        """Stream `events` as NDJSON; abort the request if the stream ends while `open_()` (the router left)."""
        try:
            return await stream_ndjson(request, events, heartbeat_s=self.config.heartbeat_s)
        finally:
            if open_():
                await self.abort(request_id)
