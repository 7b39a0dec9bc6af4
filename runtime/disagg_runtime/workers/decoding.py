"""What the decode and colocated workers share: the decode step, and relaying its tokens to the streams.

Each request has a job with an event queue its HTTP handler streams from; the engine thread hands step
outputs (or a failure) to the event loop, which puts them on the queues and ends finished jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ..engine import GenerationRequest, StepOutput
from ..engine.preemption import PreemptionStats
from .base import Worker
from .protocol import ErrorEvent, TokenEvent

log = logging.getLogger(__name__)


class StreamedJob(Protocol):
    """A request whose tokens go to its handler through `events`; `state` ends as "done"."""

    request: GenerationRequest
    events: asyncio.Queue
    state: str


class DecodingWorker(Worker):
    """A worker that runs decode steps over `jobs` and streams their tokens (DecodeWorker, ColocatedWorker)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, StreamedJob] = {}  # every request not yet done; event loop only
        self._preemptions_seen = PreemptionStats()  # engine thread only

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
        self.metrics.stepped(seconds=time.perf_counter() - start, tokens=len(outputs))
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
        finished = False
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:  # aborted after its step was queued
                continue
            self._on_token(job)
            job.events.put_nowait(TokenEvent(token_id=out.token_id, text=out.text, finished=out.finished,
                                             finish_reason=out.finish_reason))
            if out.finished:
                self._end(job)
                finished = True
        if finished:
            self._on_released()

    def _fail(self, request_ids: list[str], message: str) -> None:
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                job.events.put_nowait(ErrorEvent(message=message, code=500))
                self._end(job)
        self._on_released()

    def fail_in_flight(self, message: str) -> None:
        """The instance is out of service: every request not yet done ends with `message`."""
        self._fail(list(self.jobs), message)

    def _end(self, job: StreamedJob) -> None:
        job.state = "done"
        self.jobs.pop(job.request.request_id, None)

    async def _token_events(self, job: StreamedJob):
        """The job's events until its last token or an error."""
        while True:
            event = await job.events.get()
            yield event
            if isinstance(event, ErrorEvent) or event.finished:
                return
