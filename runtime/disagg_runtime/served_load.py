"""The colocated served path under load: what its engine steps take, read from the worker's step trace.

The served profiler's bursts time decode steps with every sequence at one context and nothing arriving.
Under a Poisson load the colocated worker runs differently in two ways that move TPOT at the knee by
several percent each, in opposite directions (bench/NOTES-gpu.md §9):

- its prefills are launched while a decode step computes (engine/overlap.py), so the host work the engine
  profile times from idle (preparing the inputs, launching ahead of the device, reading the first tokens)
  runs behind that step. On an H200, Llama-3-8B, 763-token prefills added 2.3 ms less each to the engine's
  busy time than the 21.3 ms profiled;
- its decode steps took 1-4% longer than the profile's at 16-128 sequences (contexts spread over a few
  hundred tokens, arrivals handled on the worker's event loop beside the engine thread, batches changing).

`loaded_steps` reads a trace (workers/step_trace.py) into steady decode periods, which the served profiler
turns into the loaded points of `decode_by_batch`, and busy stretches: what is left of a stretch's time
after its decode steps (at the served step) and its prefills (at the engine profile), per prefill launched
beside decodes, is `ServedOverhead.prefill_behind_decode_s`, the term the colocated simulator adds to such
a prefill. The stretches, not the few steps around each prefill, because a prefill also slows the steps
after it a little (the batch it grows re-packs its block tables, the next graph may be larger), and a sum
of time is what a TPOT is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from disagg_planner.api import LengthHistogram, WorkloadSpec
from disagg_planner.workloads import SimRequest, sample_requests

from .workers.step_trace import StepRecord

# A step that starts later than this after the one before ended follows idle time, not the step before.
MAX_LOOP_GAP_S = 1e-3


@dataclass(frozen=True)
class DecodePeriod:
    """Two decode calls in a row at one batch: from the first's start to the next's, one device step (each
    call of an overlapped engine returns when the step before it is done)."""

    batch: int
    context: int
    seconds: float


@dataclass(frozen=True)
class BusyStretch:
    """Steps that followed each other without idle time: how long they took, end to end, and what ran."""

    seconds: float
    decodes: list[tuple[int, int]]  # (batch, context) of each decode call
    prefills: list[tuple[int, int, int]]  # (prompts, tokens, Σ squared prompt lengths) of each prefill
    from_idle: bool  # it opens with a prefill that no decode step ran beside

    @property
    def beside_decodes(self) -> list[tuple[int, int, int]]:
        """The prefills launched while decodes ran: all but an opening prefill from idle."""
        return self.prefills[1:] if self.from_idle else self.prefills


@dataclass(frozen=True)
class LoadedSteps:
    """What a loaded trace's steps took."""

    periods: list[DecodePeriod]
    stretches: list[BusyStretch]


def loaded_steps(steps: Iterable[StepRecord]) -> LoadedSteps:
    """Steady decode periods and busy stretches of one worker's steps (any order; sorted by start here)."""
    ordered = sorted(steps, key=lambda s: s.start)

    def end(s: StepRecord) -> float:
        return s.start + s.seconds

    def follows(before: StepRecord, after: StepRecord) -> bool:
        return after.start - end(before) <= MAX_LOOP_GAP_S

    periods = [DecodePeriod(b.batch, b.context, c.start - b.start)
               for a, b, c in zip(ordered, ordered[1:], ordered[2:], strict=False)
               if a.kind == b.kind == c.kind == "decode" and a.batch == b.batch == c.batch and follows(b, c)]
    groups: list[list[StepRecord]] = []
    for i, s in enumerate(ordered):
        if i == 0 or not follows(ordered[i - 1], s):
            groups.append([])
        groups[-1].append(s)
    stretches = [BusyStretch(end(g[-1]) - g[0].start, [(s.batch, s.context) for s in g if s.kind == "decode"],
                             [(s.batch, s.tokens, s.sum_sq) for s in g if s.kind == "prefill"],
                             from_idle=g[0].kind == "prefill")
                 for g in groups if not any(s.kind == "mixed" for s in g)]  # chunked steps are neither
    return LoadedSteps(periods, stretches)


def poisson_trace(rate: float, requests: int, prompt_tokens: int, output_tokens: int, seed: int,
                  spread: float = 0.08) -> list[SimRequest]:
    """`requests` Poisson arrivals at `rate` req/s, lengths uniform within `spread` of the given ones (a
    batch then holds contexts spread as a workload's are, which a burst's do not)."""
    if rate <= 0 or requests < 1:
        raise ValueError(f"a load needs a positive rate and at least one request, got {rate} req/s x {requests}")

    def around(n: int) -> LengthHistogram:
        half = max(0, round(spread * n))
        return LengthHistogram(edges=[max(1, n - half), n + half + 1], counts=[1.0])

    spec = WorkloadSpec(rate=1.0, dataset=None, input_lengths=around(prompt_tokens),
                        output_lengths=around(output_tokens))
    return sample_requests(spec, rate, requests, seed)
