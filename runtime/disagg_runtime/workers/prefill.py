"""Prefill worker: FCFS prompt batches under a token budget; each request's KV waits here until pulled.

The KV stays in the engine's cache after prefill ("parked") until a decode worker pulls it, so a
decode instance without room simply pulls later (the paper's pull model) and prefill memory is the
buffer. The prefill forward stages each request's KV for sending layer by layer (engine/kv_export.py),
so a pull ships it at once, without a gather or a wait for the engine thread. KV nobody pulls within `kv_ttl_s` (the decode worker died) is freed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from ..engine import GenerationRequest, SamplingParams, StepOutput, blocks_for
from ..kv import Endpoint, KVForbidden, KVLease, KVNotFound, KVServer, StagedKV, TransferStats, payload_layers
from ..kv.reshard import KVSlice
from ..kv.sharded import slice_lease
from .base import Worker
from .engine_thread import EngineThreadStopped
from .http import BadRequest, error_response, read_model
from .prefill_queue import PrefillQueue, QueueFull
from .protocol import (
    ErrorEvent,
    KVRankRef,
    KVSourceRef,
    PrefillRequest,
    PrefillResult,
    StagedKVRef,
    TokenEvent,
)

log = logging.getLogger(__name__)


class RequestAborted(Exception):
    """The router aborted the request while it waited."""


@dataclass(eq=False)  # by identity: jobs are kept in a set
class _Job:
    request: GenerationRequest
    done: asyncio.Future[StepOutput]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Parked:
    since: float
    # Binds the KV to the request the router sent: only a pull that presents it (the router passes it to
    # the decode worker it picks) gets the KV, so one request id cannot be used to pull another's KV.
    ticket: str
    leased: bool = False


class PrefillWorker(Worker):
    """POST /prefill (NDJSON: heartbeats, then the first token), POST /abort, and the KV server."""

    role = "prefill"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queue: PrefillQueue[_Job] = PrefillQueue(token_budget=self.config.prefill_token_budget,
                                                      max_queue=self.config.max_queue)
        self.parked: dict[str, _Parked] = {}
        # Requests whose first token is not out yet. The queue alone would miss a batch the engine thread
        # took and still runs: a drain then stopped the KV server under requests about to park their KV.
        self.unresolved: set[_Job] = set()
        self.kv_server = KVServer(self, local=Endpoint.here(self.engine.device), device=self.engine.device,
                                  port=self.config.kv_port, timeout=self.config.kv_timeout_s,
                                  on_transfer=self._transferred, token=self.token)
        self._reaper: asyncio.Task | None = None
        # A multi-rank instance (parallel.instance.InstanceEngine) lists every rank's KV server here.
        self.kv_ranks: list[KVRankRef] = []

    # ---- lifecycle ------------------------------------------------------------------------------
    async def _on_start(self) -> None:
        await self.kv_server.start()
        self._reaper = asyncio.create_task(self._reap_forever())

    async def _on_stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await self.kv_server.close()

    @property
    def kv_port(self) -> int | None:
        return self.kv_server.port

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/prefill", self.prefill_handler)
        app.router.add_post("/abort", self.abort_handler)

    def _idle(self) -> bool:
        return not len(self.queue) and not self.unresolved and not self.parked

    def _load(self) -> tuple[int, int, int]:
        return len(self.queue), self.queue.queued_tokens, len(self.parked)

    # ---- engine thread --------------------------------------------------------------------------
    def _fits(self, lengths: list[int]) -> bool:
        need = sum(blocks_for(n, self.engine.block_size) for n in lengths)
        return need <= self.engine.free_blocks

    def _step(self) -> bool:
        batch = self.queue.take_batch(self._fits)
        if not batch:
            return False
        def fail(e: Exception) -> None:
            for j in batch:
                j.loop.call_soon_threadsafe(_fail, j.done, e)

        # Finished requests' KV is freed there: nothing left to decode, no KV to park.
        outputs = self._prefill_batch([j.request for j in batch], reserve_decode=False, on_error=fail)
        if outputs is not None:
            for job, out in zip(batch, outputs, strict=True):
                job.loop.call_soon_threadsafe(self._prefilled, job, out)
        return True

    def _prefilled(self, job: _Job, out: StepOutput) -> None:
        """On the event loop: park the KV (unless finished) and wake the waiting handler."""
        if job.done.done():  # aborted while its batch ran
            if not out.finished:
                self.thread.submit(lambda: self.engine.abort(out.request_id))
            return
        if not out.finished:
            self.parked[out.request_id] = _Parked(since=time.monotonic(), ticket=secrets.token_urlsafe(24))
        job.done.set_result(out)

    # ---- HTTP -----------------------------------------------------------------------------------
    def _check(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._check_prompt(prompt_ids)
        self._check_sampling(len(prompt_ids), params)
        if rid in self.parked or self.queue.has(rid):
            raise BadRequest(f"request id {rid} is already in use")

    async def prefill_handler(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return error_response(503, "prefill worker is draining", type_="server_error")
        try:
            msg = await read_model(request, PrefillRequest, self.body_limits)
            prompt_ids = await self._tokenize(msg)
            params = SamplingParams(**msg.sampling.model_dump())
            self._check(msg.request_id, prompt_ids, params)
        except BadRequest as e:
            return e.response
        loop = asyncio.get_running_loop()
        job = _Job(GenerationRequest(msg.request_id, prompt_ids, params), loop.create_future(), loop)
        try:
            self.queue.push(msg.request_id, len(prompt_ids), job)
            self.unresolved.add(job)
            job.done.add_done_callback(lambda _done: self.unresolved.discard(job))
            self.thread.wake()
        except QueueFull as e:
            return error_response(429, str(e), type_="rate_limit_error", headers={"Retry-After": "1"})
        # Still waiting when the stream ends: the router went away before the first token.
        return await self._stream(request, self._result(job, prompt_ids), msg.request_id,
                                  lambda: not job.done.done())

    async def _result(self, job: _Job, prompt_ids: list[int]):
        try:
            out = await job.done
        except RequestAborted:
            return
        except Exception as e:  # noqa: BLE001 - the batch failed; the router gets a reason, not a hang
            yield ErrorEvent(message=f"prefill failed: {e}", code=500)
            return
        kv = None
        parked = self.parked.get(out.request_id)
        if not out.finished and parked is not None:
            shape = getattr(self.engine, "shape", None)
            kv = KVSourceRef(host=self.config.advertise_host or "", port=self.kv_server.port,
                             tp=shape.tp if shape else 1, pp=shape.pp if shape else 1, ranks=self.kv_ranks,
                             ticket=parked.ticket, staged=self._staged_ref(out.request_id))
        first = TokenEvent(token_id=out.token_id, text=out.text, finished=out.finished,
                           finish_reason=out.finish_reason)
        yield PrefillResult(request_id=out.request_id, prompt_ids=prompt_ids, first=first, kv=kv)

    async def abort(self, request_id: str) -> bool:
        """Drop a queued request or free its parked KV; False if neither."""
        job = self.queue.remove(request_id)
        if job is not None:
            _fail(job.done, RequestAborted(request_id))
            return True
        parked = self.parked.get(request_id)
        if parked is not None and not parked.leased:
            await self._free(request_id)
            return True
        return False

    # ---- KV source (called by the KV server) -----------------------------------------------------
    async def checkout(self, request_id: str, ticket: str | None) -> KVLease:
        parked = self.parked.get(request_id)
        if parked is None:
            raise KVNotFound(f"prefill worker holds no KV for {request_id} (never prefilled, expired or pulled)")
        _check_ticket(parked, request_id, ticket)
        if parked.leased:
            raise KVNotFound(f"KV of {request_id} is being sent to another decode worker")
        parked.leased = True

        async def release(ok: bool) -> None:
            parked.leased = False
            if ok:
                await self._free(request_id)

        # Staged during the prefill forward (engine/kv_export.py): no gather, no wait for the engine thread.
        staged = self._staged(request_id)
        if staged is not None:
            return KVLease(staged.header, staged, release)
        try:
            payload = await self.thread.submit(lambda: self.engine.export_kv(request_id))
        except BaseException:
            parked.leased = False
            raise
        return KVLease(payload.header, payload_layers(payload), release)

    def _single_rank_export(self):
        """The engine's KV exporter (engine/kv_export.py), or None for a multi-rank instance, whose whole
        pulls go through the engine's lockstep export."""
        shape = getattr(self.engine, "shape", None)
        return None if shape is not None and shape.world > 1 else getattr(self.engine, "kv_export", None)

    def _staged(self, request_id: str) -> StagedKV | None:
        exporter = self._single_rank_export()
        return None if exporter is None else exporter.get(request_id)

    def _staged_ref(self, request_id: str) -> StagedKVRef | None:
        """Where a decode worker on this node may read the request's staged KV directly (None: it pulls)."""
        exporter = self._single_rank_export()
        where = None if exporter is None else exporter.location(request_id)
        if where is None:
            return None
        h = exporter.get(request_id).header
        return StagedKVRef(arena=where[0], offset=where[1], model_id=h.model_id, dtype=h.dtype,
                           num_layers=h.num_layers, num_kv_heads=h.num_kv_heads, head_dim=h.head_dim,
                           num_tokens=h.num_tokens)

    def arena(self, arena_id: str):
        """A staging arena of this engine, for a decode end's direct reads (kv/server.py `map`)."""
        exporter = self._single_rank_export()
        return None if exporter is None else exporter.arena(arena_id)

    async def checkout_slice(self, request_id: str, kv_slice: KVSlice, ticket: str | None) -> KVLease:
        """A slice of this rank's KV of a parked request; the request stays parked until `release_pulled`."""
        if request_id not in self.parked:
            raise KVNotFound(f"prefill worker holds no KV for {request_id} (never prefilled, expired or released)")
        _check_ticket(self.parked[request_id], request_id, ticket)
        payload = await self.thread.submit(lambda: self.engine.export_kv(request_id))
        held = getattr(self.engine, "kv_share", None) or KVSlice.of(range(self.engine.num_layers),
                                                                     range(self.engine.num_kv_heads))
        return slice_lease(payload, held, kv_slice)

    async def release_pulled(self, request_id: str, ticket: str | None) -> None:
        """Every decode rank has its slices, or a direct read has the bytes: free the request's KV (on every
        rank of this instance).

        Answered once the KV is no longer parked; the engine thread frees its blocks and staging right after.
        A direct read's confirmation waits for this answer, and needs only that the KV was still here when
        the release came, not the engine thread's turn.
        """
        if request_id not in self.parked:
            raise KVNotFound(f"prefill worker holds no KV for {request_id}")
        _check_ticket(self.parked[request_id], request_id, ticket)
        freed = self._unpark(request_id)
        if freed is not None:
            freed.add_done_callback(_log_failed_free)

    def fail_in_flight(self, message: str) -> None:
        """The instance is out of service: every queued request ends with `message`, parked KV is dropped."""
        for rid in self.queue.ids():
            job = self.queue.remove(rid)
            if job is not None:
                _fail(job.done, RuntimeError(message))
        self.parked.clear()

    def _unpark(self, request_id: str) -> asyncio.Future | None:
        """The request's KV is no longer parked; the engine thread frees it next (the future of that, or None
        if nothing was parked or the engine is gone, and its memory with it)."""
        if self.parked.pop(request_id, None) is None:
            return None
        try:
            return self.thread.submit(lambda: self.engine.abort(request_id))
        except EngineThreadStopped:
            return None

    async def _free(self, request_id: str) -> None:
        freed = self._unpark(request_id)
        if freed is None:
            return
        try:
            await freed
        except EngineThreadStopped:
            pass  # the engine stopped before it got to it: its memory is gone with it

    def _transferred(self, stats: TransferStats) -> None:
        self.metrics.transferred(channel=stats.channel, wire_bytes=stats.wire_bytes, seconds=stats.seconds)

    async def _reap_forever(self) -> None:
        period = min(1.0, self.config.kv_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.config.kv_ttl_s
            for rid, parked in list(self.parked.items()):
                if parked.since < cutoff and not parked.leased:
                    log.warning("freeing KV of %s: no decode worker pulled it within %.0fs", rid,
                                self.config.kv_ttl_s)
                    await self._free(rid)


def _log_failed_free(freed: asyncio.Future) -> None:
    if not freed.cancelled() and freed.exception() is not None and not isinstance(freed.exception(),
                                                                                   EngineThreadStopped):
        log.error("freeing released KV failed: %s", freed.exception())


def _check_ticket(parked: _Parked, request_id: str, ticket: str | None) -> None:
    if not hmac.compare_digest((ticket or "").encode(), parked.ticket.encode()):
        raise KVForbidden(f"a pull for {request_id} without the ticket issued with its KV")


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
