"""Colocated worker (the vLLM-style baseline): one engine runs both phases, continuous batching, prefill first.

The scheduler is the one the planner's colocated simulator models (disagg_planner/simulator/colocated.py),
so measured and predicted attainment compare like for like. Each engine step is either
  - a prefill batch: when the head of the FCFS wait queue may be admitted (its prompt's KV fits with the
    engine's watermark to spare and no preempted request waits to resume), waiting prompts are taken in
    order while they fit the token budget and the KV, or
  - one decode step for every running request, when nothing waiting fits. KV for generated tokens comes
    on demand; when it runs out the engine preempts the latest admitted, which resume here.
Prefill therefore stalls decode, which is the interference disaggregation removes. There is no KV
transfer: the request's tokens (first token, then the rest) come from this one instance, on the relay
connection the router named when it submitted the request (workers/relay.py).

With `colocated_prefill="chunked"` (`--colocated-prefill chunked`) every step is instead a mixed step of
the running decodes plus prompt chunks up to `--chunk-token-budget` tokens (workers/chunked_schedule.py).

The wait queue is shared by the event loop (push, abort) and the engine thread (take), under a lock;
everything that touches the engine runs on the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from aiohttp import web

from ..engine import GenerationRequest, SamplingParams, StepOutput, blocks_for
from .chunked_schedule import ChunkedStepper
from .decoding import DecodingWorker
from .engine_thread import EngineThreadStopped
from .http import BadRequest, error_response, read_model
from .protocol import Accepted, GenerateRequest, PrefillRequest
from .relay import TokenSink

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: a job is found in the wait queue by itself, not by equal fields
class _Job:
    request: GenerationRequest
    blocks: int  # KV blocks of the prompt, taken at prefill (decoding takes more on demand)
    sink: TokenSink
    state: str = "waiting"  # waiting -> running -> done


class ColocatedWorker(DecodingWorker):
    """POST /generate (answers `Accepted`; tokens, the first included, go out on GET /relay), POST /abort."""

    role = "colocated"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, _Job] = {}  # narrows DecodingWorker.jobs to this worker's job type
        self._waiting: deque[_Job] = deque()
        self._waiting_tokens = 0
        self._lock = threading.Lock()
        self._chunked = (ChunkedStepper(self, self.config.chunk_token_budget)
                         if self.config.colocated_prefill == "chunked" else None)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def _on_start(self) -> None:
        pass  # nothing beside the engine thread: no KV server, no puller

    async def _on_stop(self) -> None:
        pass  # its requests were ended at shutdown (DecodingWorker._end_streams)

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self.generate_handler)
        app.router.add_post("/abort", self.abort_handler)

    def _idle(self) -> bool:
        return not self.jobs

    def _load(self) -> tuple[int, int, int]:
        with self._lock:
            queued, tokens = len(self._waiting), self._waiting_tokens
        return queued, tokens, len(self.jobs) - queued

    # ---- engine thread --------------------------------------------------------------------------
    def _take_prefill_batch(self) -> list[_Job]:
        """The FCFS prefix to prefill now: empty unless the head may be admitted (prefill priority)."""
        room = self.config.max_batch - self.engine.num_running
        budget = self.config.prefill_token_budget
        with self._lock:
            batch: list[_Job] = []
            tokens = blocks = 0
            for job in self._waiting:
                n = len(job.request.prompt_ids)
                if batch and tokens + n > budget:  # a head longer than the budget still runs alone
                    break
                if len(batch) >= room or not self.engine.can_admit(n, pending_blocks=blocks):
                    break
                batch.append(job)
                tokens += n
                blocks += job.blocks
            for _ in batch:
                self._waiting.popleft()
            self._waiting_tokens -= tokens
        return batch

    def _step(self) -> bool:
        if self._chunked is not None:
            return self._chunked.step()
        batch = self._take_prefill_batch()
        if batch:
            self._prefill(batch)
            return True
        if self.engine.has_decode_work:
            return self._decode_step()
        return False

    def _prefill(self, batch: list[_Job]) -> None:
        def fail(e: Exception) -> None:
            for job in batch:
                self.engine.abort(job.request.request_id)
            self.loop.call_soon_threadsafe(self._fail, [j.request.request_id for j in batch],
                                           f"prefill failed: {e}")

        def decoded(outputs: list[StepOutput]) -> None:  # the step in flight before this prefill: stream it now
            if outputs:
                self.loop.call_soon_threadsafe(self._dispatch, outputs)

        # Overlapped, the first tokens come with the next decode call, which launches its step first.
        outputs = self._prefill_batch([j.request for j in batch], reserve_decode=True, on_error=fail,
                                      on_decoded=decoded, overlapped=True)
        if outputs:
            self.loop.call_soon_threadsafe(self._dispatch, outputs)

    def _on_token(self, job: _Job) -> None:
        job.state = "running"

    # ---- HTTP -----------------------------------------------------------------------------------
    def _job(self, msg: PrefillRequest, prompt_ids: list[int], sink: TokenSink) -> _Job:
        self._check_prompt(prompt_ids)
        params = SamplingParams(**msg.sampling.model_dump())
        self._check_sampling(len(prompt_ids), params)
        if msg.request_id in self.jobs:
            raise BadRequest(f"request id {msg.request_id} is already in use")
        return _Job(GenerationRequest(msg.request_id, prompt_ids, params),
                    blocks_for(len(prompt_ids), self.engine.block_size), sink)

    def _enqueue(self, job: _Job) -> bool:
        """Append to the wait queue; False when it holds `max_queue` requests."""
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                return False
            self._waiting.append(job)
            self._waiting_tokens += len(job.request.prompt_ids)
        self.jobs[job.request.request_id] = job
        self.thread.wake()
        return True

    async def generate_handler(self, request: web.Request) -> web.Response:
        if self.draining:
            return error_response(503, "colocated worker is draining", type_="server_error")
        try:
            msg = await read_model(request, GenerateRequest, self.body_limits)
            job = self._job(msg, await self._tokenize(msg), self._sink(msg.relay))
        except BadRequest as e:
            return e.response
        if not self._enqueue(job):
            return error_response(429, f"colocated worker has {self.config.max_queue} requests waiting",
                                  type_="rate_limit_error", headers={"Retry-After": "1"})
        accepted = Accepted(request_id=job.request.request_id, prompt_tokens=len(job.request.prompt_ids))
        return web.Response(body=accepted.model_dump_json(), content_type="application/json")

    async def abort(self, request_id: str) -> bool:
        """Drop a waiting request or stop a running one and free its KV; False if unknown or done."""
        job = self.jobs.get(request_id)
        if job is None:
            return False
        self._end(job)
        with self._lock:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
                self._waiting_tokens -= len(job.request.prompt_ids)
        if not waiting:
            # Taken by the engine thread (commands run between steps, so its prefill has completed).
            try:
                await self.thread.submit(lambda: self.engine.abort(request_id))
            except EngineThreadStopped:
                pass  # the engine is gone, and its memory with it
        return True
