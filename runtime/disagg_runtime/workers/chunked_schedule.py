"""The colocated worker's step under chunked prefill (what disagg_planner/simulator/colocated_chunked.py models).

Every step is one engine forward carrying a token for each running request plus chunks of waiting prompts,
up to the chunk token budget: the decode tokens count first, then the prompts already being prefilled
continue in FCFS order, then new prompts are admitted from the wait queue while the engine would admit them (prompt blocks with the
watermark free, no preempted request waiting),
the batch has room and the prompts in progress do not already fill what is left of the budget. A prompt's
first token comes with its last chunk.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..engine import GenerationRequest
from ..engine.chunked import PrefillChunk

if TYPE_CHECKING:
    from .colocated import ColocatedWorker

log = logging.getLogger(__name__)


class _Job(Protocol):
    """What the stepper needs of a colocated worker's job."""

    request: GenerationRequest
    blocks: int


@dataclass
class _InProgress:
    job: _Job
    done: int  # prompt tokens with KV
    length: int

    @property
    def left(self) -> int:
        return self.length - self.done


def plan_chunks(in_progress: list[_InProgress], room: int) -> list[tuple[_InProgress, int]]:
    """FCFS chunks filling `room` tokens: (prompt, tokens of it this step)."""
    out = []
    for p in in_progress:
        if room <= 0:
            break
        take = min(p.left, room)
        out.append((p, take))
        room -= take
    return out


class ChunkedStepper:
    """Runs the colocated worker's engine steps as mixed steps (engine thread only)."""

    def __init__(self, worker: ColocatedWorker, budget: int) -> None:
        if budget < 2:
            raise ValueError(f"chunk token budget must be at least 2 (one decode token and one prompt token), "
                             f"got {budget}")
        self.worker = worker
        self.budget = budget
        self.in_progress: deque[_InProgress] = deque()

    def step(self) -> bool:
        """One mixed step; False when there is nothing to run."""
        w, engine = self.worker, self.worker.engine
        present = set(engine.request_ids)
        self.in_progress = deque(p for p in self.in_progress if p.job.request.request_id in present)  # aborted
        decoding = engine.num_running - engine.num_preempted - len(self.in_progress)
        room = self.budget - decoding
        self._admit(room)
        chunks = plan_chunks(list(self.in_progress), room)
        if not chunks and decoding == 0 and not engine.num_preempted:  # preempted ones resume in a step
            return False
        context = w._traced_context()
        start = time.perf_counter()
        try:
            outputs = engine.mixed_step([PrefillChunk(p.job.request.request_id, n) for p, n in chunks])
        except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving new ones
            log.exception("mixed step failed")
            failed = engine.request_ids
            for rid in failed:
                engine.abort(rid)
            self.in_progress.clear()
            w.loop.call_soon_threadsafe(w._fail, failed, f"mixed step failed: {e}")
            return True
        w._stepped("mixed", start, batch=decoding, tokens=decoding + sum(n for _, n in chunks),
                   context=context)
        for p, n in chunks:
            p.done += n
        while self.in_progress and self.in_progress[0].left == 0:
            self.in_progress.popleft()
        if outputs:
            w.loop.call_soon_threadsafe(w._dispatch, outputs)
        return True

    def _admit(self, room: int) -> None:
        """Move waiting jobs into the engine while the rule in the module doc allows."""
        w, engine = self.worker, self.worker.engine
        pending = sum(p.left for p in self.in_progress)
        blocks = 0  # prompt blocks of the jobs taken below, not yet allocated
        slots = w.config.max_batch - engine.num_running
        taken = []
        with w._lock:
            while w._waiting and pending < room and slots > 0 and engine.can_admit(
                    len(w._waiting[0].request.prompt_ids), pending_blocks=blocks):
                job = w._waiting.popleft()
                n = len(job.request.prompt_ids)
                w._waiting_tokens -= n
                taken.append(job)
                pending += n
                blocks += engine.blocks.blocks_for(n)
                slots -= 1
        for job in taken:
            try:
                engine.admit_chunked(job.request)
            except Exception as e:  # noqa: BLE001 - this request fails, the others still run
                log.warning("admitting %s failed: %s", job.request.request_id, e)
                w.loop.call_soon_threadsafe(w._fail, [job.request.request_id], f"admission failed: {e}")
                continue
            self.in_progress.append(_InProgress(job, 0, len(job.request.prompt_ids)))
