"""Overlapped decoding: the host prepares and launches step n+1 while the device still runs step n.

A synchronous decode step leaves the GPU idle while the host reads the sampled ids, appends them,
detokenizes, checks stops and builds the next step's inputs: ~15-25 us per sequence, 2+ ms at batch 128
against a 6-8 ms step. Here a step is split in two:

- `launch` builds step n+1 from what the host knows. A sequence whose last token is still on the device
  (sampled by step n, not read yet) gets it by a device-side gather from step n's sampled ids, so nothing
  waits. Positions, slots and block growth need only the count of tokens, which the host knows. Sampling
  stays on the device and one asynchronous device-to-host copy per step brings the ids to pinned memory.
- `complete` waits for step n's copy, then appends, detokenizes and decides who finished: while the
  device runs step n+1.

A prefill can end the same way (`Engine.prefill(overlapped=True)`, what the colocated worker runs): its
first tokens are sampled and copied like a step's, and the next decode step gathers them on the device,
so the device goes from the prompts straight to the next step instead of idling while the host reads the
first tokens and prepares that step.

A sequence that finishes at step n by EOS or a stop string is already part of step n+1: that one extra row
is computed and dropped, as in vLLM's asynchronous scheduling. One that will reach max_tokens is left out
of the launch (the host can count). Preemption and resumption need settled host state, so when a step
would preempt or a preempted sequence waits, the step in flight is completed first and the step runs as a
plain synchronous one. The blocks of a request released (finished or aborted) while a launched step still
writes them go back to the allocator only once that step completes, so no one else's KV lands in them
first, whichever stream writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .layouts import decode_layout
from .sampler import sample_ids

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence
    from .types import StepOutput


@dataclass
class InFlightStep:
    """A launched decode step: its rows' sequences and the sampled ids on their way to the host."""

    seqs: list[Sequence]
    ids: torch.Tensor  # int64 [B] on the device: what the next step gathers its inputs from
    host: torch.Tensor  # int64 [B], pinned on a GPU: the copy `complete` reads
    done: torch.cuda.Event | None  # recorded after the copy (None on CPU: the copy is already done)


class PinnedIds:
    """Two alternating host buffers for sampled ids: one may be read while the other is being filled."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: list[torch.Tensor] = [torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)]
        self._turn = 0

    def take(self, n: int) -> torch.Tensor:
        self._turn ^= 1
        buf = self._bufs[self._turn]
        if buf.numel() < n:
            size = max(n, 2 * buf.numel(), 64)
            buf = torch.empty(size, dtype=torch.long, pin_memory=self.device.type == "cuda")
            self._bufs[self._turn] = buf
        return buf[:n]


def settled(engine: Engine) -> bool:
    """Whether the next step can launch without preempting or resuming anyone (which needs host state)."""
    if engine.num_preempted:
        return False
    running = engine._running()
    return engine.blocks.total_growth(running) <= engine.allocator.free


def launchable(engine: Engine) -> list[Sequence]:
    """Running sequences that still need a token after the ones already sampled."""
    return [s for s in engine._running() if not s.finished and s.generated < s.request.sampling.max_tokens]


def launch(engine: Engine, prev: InFlightStep | None) -> InFlightStep | None:
    """Build and launch one decode step over `launchable` sequences; None when there is nothing to run.

    Blocks must already be grown (`preemption.grow_or_preempt`). Rows whose input is `prev`'s sampled id
    take it on the device.
    """
    seqs = launchable(engine)
    if not seqs:
        return None
    prev_row = {id(s): i for i, s in enumerate(prev.seqs)} if prev is not None else {}
    tokens, src = [], []
    for s in seqs:
        if s.pending:
            tokens.append(0)
            src.append(prev_row[id(s)])
        else:
            tokens.append(s.output_ids[-1])
            src.append(-1)
    layout, positions = decode_layout(engine.cache, seqs)
    gather = (prev.ids, src) if prev is not None and any(i >= 0 for i in src) else None
    logits = engine._run(tokens, positions, layout, list(range(len(seqs))), gather=gather)
    for s in seqs:
        s.num_cached += 1
    return sample_in_flight(engine, seqs, logits)


def after_prefill(engine: Engine, seqs: list[Sequence], logits: torch.Tensor, *,
                  on_decoded: Callable[[list[StepOutput]], None] | None, overlapped: bool) -> bool:
    """A prefill of `seqs` is launched: hand the step in flight (which ends first on the device) to
    `on_decoded`, and with `overlapped`, on an engine that overlaps its steps, leave the prompts' first
    tokens in flight. True when they were left there (the prefill then returns no tokens)."""
    if on_decoded is not None and engine._in_flight is not None:
        engine.settle()
        on_decoded(engine.take_completed())
    if not (overlapped and engine.overlap_decode and engine.step_runner is None):
        return False
    engine.settle()  # one step in flight at a time; without on_decoded its tokens wait in _completed
    engine._in_flight = sample_in_flight(engine, seqs, logits)
    return True


def sample_in_flight(engine: Engine, seqs: list[Sequence], logits: torch.Tensor) -> InFlightStep:
    """Sample one token per row of `logits` on the device and start its copy to the host; nothing waits.

    What a launched decode step ends with, and what an overlapped prefill (`Engine.prefill(overlapped=True)`)
    ends with too: the prompts' first tokens are then pending like a decode step's.
    """
    params = [s.request.sampling for s in seqs]
    ids = sample_ids(logits, params, [s.generated for s in seqs], engine._rng)
    host = engine._pinned_ids.take(len(seqs))
    done = None
    if ids.is_cuda:
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host.copy_(ids)
    for s in seqs:
        s.pending += 1
    return InFlightStep(seqs=seqs, ids=ids, host=host, done=done)


def complete(engine: Engine, step: InFlightStep) -> list[StepOutput]:
    """Wait for `step`'s ids and record them; outputs of the sequences still here and not yet finished."""
    if step.done is not None:
        step.done.synchronize()
    for blocks in engine._held_blocks:
        engine.allocator.release(blocks)
    engine._held_blocks.clear()
    outputs = []
    for seq, token in zip(step.seqs, step.host.tolist(), strict=True):
        seq.pending -= 1
        if seq.finished or engine._seqs.get(seq.request_id) is not seq:
            continue  # finished at the step before (this row was speculative) or aborted meanwhile
        outputs.append(seq.append(token, engine.eos_token_ids))
    return outputs


def gathered(ids: torch.Tensor, prev_ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`ids` with entry i replaced by prev_ids[rows[i]] wherever rows[i] >= 0, on the device."""
    src = torch.tensor(rows, dtype=torch.long).to(ids.device, non_blocking=True)
    return torch.where(src >= 0, prev_ids[src.clamp(min=0)], ids)
