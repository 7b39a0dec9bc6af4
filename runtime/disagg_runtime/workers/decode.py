"""Decode worker: continuous batching over requests whose KV it pulls from prefill workers.

A request waits (FIFO) until the engine may admit it (its prompt's KV fits with the engine's watermark to
spare, and no preempted request waits to resume); only then is its KV pulled (the paper's pull model: a
burst of prefills cannot overrun decode memory, the KV waits on the prefill side). The prompt's blocks are
reserved on the engine thread before the pull, so decode steps cannot grow into them while it is in
flight. Blocks for generated tokens come on demand; when they run out the engine preempts the latest
admitted requests, which stay here and resume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from itertools import islice

import torch
from aiohttp import web

from ..engine import (
    EngineError,
    GenerationRequest,
    InvalidRequest,
    RequestTooLarge,
    SamplingParams,
)
from ..kv import (
    DirectReadUnavailable,
    Endpoint,
    KVAddress,
    KVChannelError,
    KVHeader,
    KVMismatchError,
    KVNotFound,
    KVPayload,
    KVPuller,
    TransferStats,
)
from .decoding import DecodingWorker
from .engine_thread import EngineThreadStopped
from .http import BadRequest, error_response, read_model
from .protocol import Accepted, DecodeRequest, KVSourceRef
from .relay import TokenSink
from .sharded_kv import ShardedKVImport

log = logging.getLogger(__name__)


class _HeldTokens:
    """A sink that keeps a request's tokens until `replay` (while a direct read is being confirmed)."""

    def __init__(self) -> None:
        self._calls: list[tuple[str, tuple]] = []

    def token(self, request_id: str, token_id: int, text: str, finish_reason: str | None) -> None:
        self._calls.append(("token", (request_id, token_id, text, finish_reason)))

    def error(self, request_id: str, code: int, message: str) -> None:
        self._calls.append(("error", (request_id, code, message)))

    def replay(self, sink: TokenSink) -> None:
        for name, args in self._calls:
            getattr(sink, name)(*args)
        self._calls.clear()


@dataclass
class _Job:
    request: GenerationRequest
    first_token: int
    source: KVAddress
    sink: TokenSink
    ref: KVSourceRef | None = None
    state: str = "waiting"  # waiting -> pulling -> running -> done
    aborted: bool = False


class DecodeWorker(DecodingWorker):
    """POST /decode (answers `Accepted`; tokens go out on the router's GET /relay stream), POST /abort."""

    role = "decode"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, _Job] = {}  # narrows DecodingWorker.jobs to this worker's job type
        self.waiting: deque[_Job] = deque()
        self.puller = KVPuller(local=Endpoint.here(self.engine.device), device=self.engine.device,
                               channel=self.config.kv_channel, codec=self.config.kv_compression,
                               timeout=self.config.kv_timeout_s, on_transfer=self._transferred,
                               token=self.token)
        self.sharded_kv = ShardedKVImport(self.engine, self.puller)
        self._wakeup = asyncio.Event()
        self._admitter: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._retiring: deque[tuple[torch.cuda.Event, KVPayload]] = deque()  # see _retire

    async def _on_start(self) -> None:
        self._admitter = asyncio.create_task(self._admit_forever())

    async def _on_stop(self) -> None:
        if self._admitter is not None:
            self._admitter.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.puller.close()

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/decode", self.decode_handler)
        app.router.add_post("/abort", self.abort_handler)

    def _idle(self) -> bool:
        return not self.jobs

    def _load(self) -> tuple[int, int, int]:
        queued_tokens = sum(len(j.request.prompt_ids) for j in self.waiting)
        return len(self.waiting), queued_tokens, len(self.jobs) - len(self.waiting)

    # ---- engine thread --------------------------------------------------------------------------
    def _step(self) -> bool:
        if not self.engine.has_decode_work:
            return False
        preempted = self.engine.num_preempted
        stepped = self._decode_step()
        if preempted and not self.engine.num_preempted:
            self.loop.call_soon_threadsafe(self._wakeup.set)  # admission waited for them to resume
        return stepped

    def _on_released(self) -> None:
        self._wakeup.set()  # the engine released their blocks: someone waiting may fit now

    # ---- admission and pulls --------------------------------------------------------------------
    async def _admit_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.waiting:
                room = self.config.max_batch - (len(self.jobs) - len(self.waiting))
                candidates = list(islice(self.waiting, max(room, 0)))
                if not candidates:
                    break
                try:
                    taken = await self.thread.submit(lambda c=candidates: self._reserve(c))
                except EngineThreadStopped:
                    return
                for job in candidates[:taken]:
                    if job.aborted:  # aborted while waiting for the engine thread: give its blocks back
                        self._forget(job.request.request_id)
                        continue
                    self.waiting.remove(job)
                    job.state = "pulling"
                    task = asyncio.create_task(self._pull(job))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if taken < len(candidates):
                    break

    def _reserve(self, candidates: list[_Job]) -> int:
        """On the engine thread: reserve prompt blocks for the FCFS prefix that may be admitted; its length."""
        for n, job in enumerate(candidates):
            if not self.engine.reserve(job.request.request_id, len(job.request.prompt_ids)):
                return n
        return len(candidates)

    def _forget(self, request_id: str) -> None:
        """Free whatever the engine holds for a request, without waiting (it may hold nothing)."""
        try:
            self.thread.submit(lambda: self.engine.abort(request_id))
        except EngineThreadStopped:
            pass  # the engine is gone, and its memory with it

    def _expect(self, job: _Job):
        engine = self.engine

        def check(header: KVHeader) -> None:
            if header.num_tokens != len(job.request.prompt_ids):
                raise KVMismatchError(f"request {header.request_id}: KV holds {header.num_tokens} tokens, "
                                      f"the prompt has {len(job.request.prompt_ids)}")
            if header.model_id != engine.model_id or header.dtype != engine.dtype_name:
                raise KVMismatchError(f"request {header.request_id}: KV from model {header.model_id} "
                                      f"({header.dtype}); this worker serves {engine.model_id} ({engine.dtype_name})")

        return check

    async def _pull(self, job: _Job) -> None:
        rid = job.request.request_id
        imported = False
        try:
            if job.ref is not None and self.sharded_kv.applies(job.ref):
                await self.sharded_kv.pull_and_import(job.request, job.ref, job.first_token, self.thread.submit)
            else:
                payload, direct = await self._fetch(job)
                if job.aborted:
                    if direct is not None:
                        self._release_quietly(job)  # read, not pulled: the prefill worker still holds it
                    return
                if direct is None:
                    self._retire((await self.thread.submit(lambda: self._import(job, payload)))[0], payload)
                else:
                    await self._import_confirmed(job, payload, direct)
            imported = True
            if job.state != "done":  # its last token may have gone out already
                job.state = "running"
            if job.aborted:  # aborted while importing: free what import took
                await self.thread.submit(lambda: self.engine.abort(rid))
            else:
                self.thread.wake()
        except (KVChannelError, EngineError, EngineThreadStopped, InvalidRequest, RequestTooLarge,
                KVMismatchError) as e:
            log.warning("request %s failed before decoding: %s", rid, e)
            job.sink.error(rid, 502, f"KV from {job.source} unusable: {e}")
            self._end(job)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the waiting stream must end
            log.exception("request %s failed importing its KV", rid)
            job.sink.error(rid, 500, f"decode worker failed to import the KV: {e}")
            self._end(job)
        finally:
            if not imported:
                self._forget(rid)  # the reservation made before the pull, or the sequence an import made
            self._wakeup.set()

    async def _fetch(self, job: _Job) -> tuple[KVPayload, TransferStats | None]:
        """The request's KV, read directly out of the prefill's staging arena when the prefill worker said
        where it is and the link allows it (then with the read's stats, recorded once it is confirmed), else
        pulled (the puller records the pull)."""
        rid = job.request.request_id
        staged = job.ref.staged if job.ref is not None else None
        if staged is not None:
            # Fields validated as the request came in (StagedKVRef's bounds are KVHeader's, or tighter).
            header = KVHeader.model_construct(request_id=rid, model_id=staged.model_id, num_layers=staged.num_layers,
                                              num_kv_heads=staged.num_kv_heads, head_dim=staged.head_dim,
                                              dtype=staged.dtype, num_tokens=staged.num_tokens)
            try:
                return await self.puller.read_direct(job.source, header, staged.arena, staged.offset,
                                                     expect=self._expect(job))
            except DirectReadUnavailable as e:
                log.debug("request %s: no direct KV read from %s (%s); pulling it", rid, job.source, e)
        payload = await self.puller.pull(job.source, rid, expect=self._expect(job),
                                         ticket=job.ref.ticket if job.ref else None)
        return payload, None

    async def _import_confirmed(self, job: _Job, payload: KVPayload, read: TransferStats) -> None:
        """Import directly read KV while the prefill worker confirms (and frees) it.

        The release doubles as the proof that the bytes were still this request's while they were copied:
        a prefill worker frees KV only on a release, an abort or its TTL, and the last two make the release
        fail. Both run at once, so the confirmation costs the request only what outlasts the import.
        """
        rid = job.request.request_id
        ticket = job.ref.ticket if job.ref else None

        async def confirm() -> float:
            await self.puller.release(job.source, rid, ticket=ticket)
            return time.perf_counter()

        # Decode steps may run on the imported KV before the confirmation comes; their tokens wait here.
        sink, job.sink = job.sink, _HeldTokens()
        try:
            imported, confirmed = await asyncio.gather(self.thread.submit(lambda: self._import(job, payload)),
                                                       confirm(), return_exceptions=True)
        finally:
            held, job.sink = job.sink, sink
        if isinstance(imported, BaseException):
            raise imported
        self._retire(imported[0], payload)
        if not isinstance(confirmed, BaseException):
            held.replay(sink)
        else:
            if isinstance(confirmed, KVNotFound):
                raise KVChannelError(f"the prefill worker freed the KV of {rid} (expired or aborted) before "
                                     "its direct read was confirmed") from confirmed
            raise KVChannelError(f"the direct read of {rid} could not be confirmed: {confirmed}") from confirmed
        waited = max(0.0, confirmed - imported[1])
        self._transferred(replace(read, seconds=read.seconds + waited))

    def _release_quietly(self, job: _Job) -> None:
        async def release() -> None:
            try:
                await self.puller.release(job.source, job.request.request_id,
                                          ticket=job.ref.ticket if job.ref else None)
            except KVChannelError as e:
                log.info("request %s: releasing its KV after an abort failed: %s", job.request.request_id, e)

        task = asyncio.create_task(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _import(self, job: _Job, payload: KVPayload) -> tuple[torch.cuda.Event | None, float]:
        """On the engine thread: place the KV; an event that completes when the copies out of the payload ran
        (None off the GPU), and when the import returned."""
        self.engine.import_kv(job.request, payload, job.first_token)
        done = None
        if payload.keys[0].is_cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(payload.keys[0].device))
        return done, time.perf_counter()

    def _retire(self, done: torch.cuda.Event | None, payload: KVPayload) -> None:
        """Keep a landed payload until `done` (the engine's copies out of it ran): its memory belongs to the KV
        link's copy stream, which would reuse it without waiting for the engine's stream."""
        while self._retiring and self._retiring[0][0].query():
            self._retiring.popleft()
        if done is not None:
            self._retiring.append((done, payload))

    # ---- HTTP -----------------------------------------------------------------------------------
    def _job(self, msg: DecodeRequest) -> _Job:
        params = SamplingParams(**msg.sampling.model_dump())
        self._check_sampling(len(msg.prompt_ids), params)
        if msg.request_id in self.jobs:
            raise BadRequest(f"request id {msg.request_id} is already in use")
        sink = self._sink(msg.relay)
        request = GenerationRequest(msg.request_id, list(msg.prompt_ids), params)
        return _Job(request, msg.first_token_id, KVAddress(msg.kv.host, msg.kv.port), sink, ref=msg.kv)

    async def decode_handler(self, request: web.Request) -> web.Response:
        if self.draining:
            return error_response(503, "decode worker is draining", type_="server_error")
        if len(self.waiting) >= self.config.max_queue:
            return error_response(429, f"decode worker has {len(self.waiting)} requests waiting for KV",
                                  type_="rate_limit_error", headers={"Retry-After": "1"})
        try:
            job = self._job(await read_model(request, DecodeRequest, self.body_limits))
        except BadRequest as e:
            return e.response
        self.jobs[job.request.request_id] = job
        self.waiting.append(job)
        self._wakeup.set()
        accepted = Accepted(request_id=job.request.request_id, prompt_tokens=len(job.request.prompt_ids))
        return web.Response(body=accepted.model_dump_json(), content_type="application/json")

    async def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is (waiting, pulling or decoding); False if unknown or done."""
        job = self.jobs.get(request_id)
        if job is None:
            return False
        job.aborted = True
        state = job.state
        self._end(job)
        if state == "waiting":
            self.waiting.remove(job)
        elif state == "running":
            try:
                await self.thread.submit(lambda: self.engine.abort(request_id))
            except EngineThreadStopped:
                pass  # nothing left to free
            self._wakeup.set()
        return True

    def fail_in_flight(self, message: str) -> None:
        """The instance is out of service: waiting, pulling and running requests all end with `message`."""
        for job in self.jobs.values():
            job.aborted = True
        self.waiting.clear()
        super().fail_in_flight(message)

    def _transferred(self, stats: TransferStats) -> None:
        channel = f"{stats.channel}-direct" if stats.direct else stats.channel
        self.metrics.transferred(channel=channel, wire_bytes=stats.wire_bytes, seconds=stats.seconds)
