"""What the decode and colocated workers share: the decode step, and relaying its tokens to the router.

Each request has a job whose `sink` is the relay connection of the router that submitted it
(workers/relay.py); the engine thread hands each step's outputs (or a failure) to the event loop, which
appends every token to its connection's pending frame and ends finished jobs.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from aiohttp import web

from ..engine import GenerationRequest, StepOutput
from ..engine.preemption import PreemptionStats
from .base import Worker
from .http import BadRequest
from .relay import RelayConnection, RelayHub, TokenSink

log = logging.getLogger(__name__)


class StreamedJob(Protocol):
    """A request whose tokens go to `sink`; `state` ends as "done"."""

    request: GenerationRequest
    sink: TokenSink
    state: str


class DecodingWorker(Worker):
    """A worker that runs decode steps over `jobs` and streams their tokens (DecodeWorker, ColocatedWorker)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, StreamedJob] = {}  # every request not yet done; event loop only
        self._preemptions_seen = PreemptionStats()  # engine thread only
        self.relay = RelayHub(self.config.heartbeat_s, self._relay_closed)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/relay", self.relay.handler)
        app.on_shutdown.append(self._end_streams)  # else shutdown waits for the long-lived streams
        return app

    async def _end_streams(self, _app: web.Application) -> None:
        """Shutting down: every request not yet done ends with a 503, then the relay streams end."""
        for rid, job in list(self.jobs.items()):
            job.sink.error(rid, 503, f"{self.role} worker is shutting down")
            self._end(job)
        await self.relay.close()

    def _sink(self, relay_id: str) -> RelayConnection:
        """The open relay connection a request names; BadRequest (409) if it is not open."""
        conn = self.relay.get(relay_id)
        if conn is None or conn.closed:
            raise BadRequest(f"relay connection {relay_id} is not open; open GET /relay?id={relay_id} first",
                             status=409)
        return conn

    def _relay_closed(self, conn: RelayConnection) -> None:
        """The router of `conn` went away: nobody reads its requests' tokens any more."""
        for rid, job in list(self.jobs.items()):
            if job.sink is conn and job.state != "done":
                self.loop.create_task(self.abort(rid))

    # ---- subclass hooks -------------------------------------------------------------------------
    def _on_token(self, job: StreamedJob) -> None:
        """A token of `job` is about to be streamed (event loop)."""

    def _on_released(self) -> None:
        """Requests ended and the engine freed their blocks (event loop)."""

    # ---- engine thread --------------------------------------------------------------------------
    def _decode_step(self) -> bool:
        """One decode step for every running request; on an engine error they all fail, new ones still run.

        False when no request could step (all preempted and waiting for blocks): the thread may idle.
        Overlapped (engine/overlap.py), the tokens returned are those of the step launched the call before.
        """
        context = self._traced_context()  # before the step: the finished ones leave in it
        start = time.perf_counter()
        try:
            outputs = self.engine.decode()
        except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving new ones
            log.exception("decode step failed")
            failed = self.engine.request_ids
            for rid in failed:
                self.engine.abort(rid)
            self.loop.call_soon_threadsafe(self._fail, failed, f"decode step failed: {e}")
            return True
        self._count_preemptions()
        if not outputs:  # an overlapped step launched whose tokens come next call is work done too
            return self.engine.decode_in_flight
        self._stepped("decode", start, batch=len(outputs), tokens=len(outputs), context=context)
        self.loop.call_soon_threadsafe(self._dispatch, outputs)
        return True

    def _count_preemptions(self) -> None:
        now, seen = self.engine.preemption_stats, self._preemptions_seen
        if now != seen:
            self.metrics.preempted(preemptions=now.preemptions - seen.preemptions,
                                   swapped_tokens=now.swapped_tokens - seen.swapped_tokens,
                                   recomputed_tokens=now.recomputed_tokens - seen.recomputed_tokens)
            self._preemptions_seen = PreemptionStats(now.preemptions, now.swapped_tokens, now.recomputed_tokens)

    # ---- event loop: results --------------------------------------------------------------------
    def _dispatch(self, outputs: list[StepOutput]) -> None:
        # Per token: a dict lookup and an append to the connection's pending frame, nothing more.
        jobs = self.jobs
        finished = False
        for out in outputs:
            job = jobs.get(out.request_id)
            if job is None:  # aborted after its step was queued
                continue
            self._on_token(job)
            if out.finished:
                job.sink.token(out.request_id, out.token_id, out.text, out.finish_reason or "stop")
                self._end(job)
                finished = True
            else:
                job.sink.token(out.request_id, out.token_id, out.text, None)
        if finished:
            self._on_released()

    def _fail(self, request_ids: list[str], message: str) -> None:
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                job.sink.error(rid, 500, message)
                self._end(job)
        self._on_released()

    def fail_in_flight(self, message: str) -> None:
        """The instance is out of service: every request not yet done ends with `message`."""
        self._fail(list(self.jobs), message)

    def _end(self, job: StreamedJob) -> None:
        job.state = "done"
        self.jobs.pop(job.request.request_id, None)
