"""Measure what the served path adds to the engine's step times; the `served` section of a latency profile.

The engine profile (`profiler.py`) times the bare engine. A served request also crosses the router and the
worker's HTTP hops, has each token relayed (NDJSON from the worker, SSE to the client) by event loops
that share an interpreter with the engine thread and, disaggregated, has its KV handed from the prefill to
the decode worker. This module starts the real serving path (`LocalCluster`: the processes a pod runs),
sends probe requests through it and records the measured time minus the engine profile's fit at the same
step:

- prefill: single requests sent back to back (an engine left idle answers its next prefill late on a
  shared CPU, which an engine under load never sees), TTFT against one engine prefill of the prompt;
- decode: bursts of B requests sent together, for B in the decode batches; the inter-token gaps while all
  B decode together (after the last joined, before the first finished; see `steady_gaps`) against one
  engine decode step of B sequences at that context. The differences, clamped at 0, become the per-batch
  table `decode_by_batch` through a non-decreasing least-squares fit (`isotonic`): the overhead is not a
  line (on an H200 ~0 up to 32 sequences, then 0.13/0.25/0.86 ms at 64/128/256), and a line fitted to
  mostly small batches under-charges the large ones 3-5x. The line
  `decode_step_s + decode_per_seq_s·B` is still fitted (`robust_line`), as the table's summary;
- under load (colocated, `ServedProbePlan.load_rate`): a Poisson trace at the workload's lengths, with the
  worker tracing its steps (served_load.py). Its steady decode steps replace the bursts' point at each
  probed batch they reach (`decode_loaded`), and the busy stretches give `prefill_behind_decode_s`: what
  each prefill launched beside decodes added to the engine's busy time beyond its engine prefill;
- KV hand-off (disaggregated): the singles' gap from the first to the second token, less the served
  decode step (the engine's step of one sequence plus the table's overhead at batch 1), fitted as fixed + per-token over prompts of two lengths: the fixed part is `kv_handoff_s`,
  the per-token part the link bandwidth the pulls saw.
"""

from __future__ import annotations

import asyncio
import bisect
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from disagg_planner.api import DecodeOverheadPoint, LatencyProfile, ServedMode, ServedOverhead, ServedProbe
from disagg_planner.latency.fit import LinearFit, fit_decode, fit_prefill, nnls
from disagg_planner.workloads import SimRequest

from .benchclient.client import RequestRecord, run_trace
from .serve.local import LocalCluster
from .served_load import LoadedSteps, loaded_steps, poisson_trace
from .workers.step_trace import read_steps

MIN_LOADED_SAMPLES = 10  # loaded steps (or prefills) a point needs: a median of fewer is one spike away


class ServedProfileError(RuntimeError):
    """The served path could not be probed (requests failed, or no measurable decode window)."""


@dataclass(frozen=True)
class ServedProbePlan:
    """What to send: prompt lengths (the first is the planner's typical prompt; a second one lets the KV
    hand-off's fixed cost be told from its per-token cost), the output length of every probe, the decode
    batch sizes to burst, how many back-to-back singles per prompt length and how many bursts per
    batch (their gaps are pooled: on a shared machine one burst can fall into another job's spike)."""

    prompt_tokens: Sequence[int]
    output_tokens: int
    decode_batches: Sequence[int]
    singles: int = 6
    bursts: int = 2
    load_rate: float | None = None  # colocated: req/s of the loaded probe (None: no loaded probe)
    load_requests: int = 300

    def __post_init__(self) -> None:
        if self.load_rate is not None and (self.load_rate <= 0 or self.load_requests < 1):
            raise ValueError(f"a loaded probe needs load_rate > 0 and load_requests >= 1, got {self.load_rate} "
                             f"and {self.load_requests}")
        if not self.prompt_tokens or min(self.prompt_tokens) < 1:
            raise ValueError(f"prompt_tokens needs at least one length >= 1, got {list(self.prompt_tokens)}")
        if self.output_tokens < 4:
            raise ValueError(f"output_tokens must be >= 4 to leave inter-token gaps, got {self.output_tokens}")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ValueError(f"decode_batches needs at least one batch >= 1, got {list(self.decode_batches)}")
        if self.singles < 1 or self.bursts < 1:
            raise ValueError(f"singles and bursts must be >= 1, got {self.singles} and {self.bursts}")


@dataclass
class _EngineTimes:
    """The engine profile's fits, in whole-instance seconds."""

    prefill: LinearFit
    decode: LinearFit

    @classmethod
    def of(cls, profile: LatencyProfile) -> _EngineTimes:
        shape = profile.shapes[0]
        return cls(fit_prefill(shape.prefill, "engine profile prefill"),
                   fit_decode(shape.decode, "engine profile decode", shape.decode_step_batches))

    def prefill_s(self, tokens: int) -> float:
        return self.prefill(tokens, tokens * tokens)

    def decode_s(self, batch: int, context_per_seq: float) -> float:
        return self.decode(batch, batch * context_per_seq)


@dataclass
class _Probes:
    """Probe results, kept as ServedProbe entries plus the per-request KV gaps of the singles."""

    entries: list[ServedProbe] = field(default_factory=list)
    first_gaps: dict[int, list[float]] = field(default_factory=dict)  # prompt tokens -> token 1 - token 0


def _ok(records: list[RequestRecord], what: str) -> list[RequestRecord]:
    good = [r for r in records if r.ok and len(r.token_times) >= 2]
    if not good:
        errors = sorted({r.error or f"HTTP {r.status}" for r in records})
        raise ServedProfileError(f"every {what} probe failed ({'; '.join(errors)[:300]}); is the server healthy?")
    return good


async def _send(url: str, trace: list[SimRequest], seed: int, timeout: float) -> list[RequestRecord]:
    return await run_trace(url, trace, model=None, prompt_mode="ids", seed=seed, timeout=timeout)


async def _singles(url: str, engine: _EngineTimes, plan: ServedProbePlan, probes: _Probes, timeout: float) -> None:
    """Back-to-back single requests at each prompt length: TTFT against one engine prefill."""
    for tokens in plan.prompt_tokens:
        trace = [SimRequest(0.0, tokens, plan.output_tokens)]
        for warm in range(2):
            await _send(url, trace, seed=10_000 + warm, timeout=timeout)
        ttfts, gaps = [], []
        for k in range(plan.singles):
            [rec] = _ok(await _send(url, trace, seed=k, timeout=timeout), f"single {tokens}-token")
            ttfts.append(rec.ttft)
            gaps.append(rec.token_times[1] - rec.token_times[0])
        probes.entries.append(ServedProbe(kind="prefill", batch_size=1, tokens=tokens, samples=len(ttfts),
                                          measured_seconds=statistics.median(ttfts),
                                          engine_seconds=engine.prefill_s(tokens)))
        probes.first_gaps[tokens] = gaps


def steady_gaps(records: list[RequestRecord], prompt_tokens: int) -> tuple[int, list[tuple[float, int]]]:
    """The most requests that decoded together, and the (gap, context per sequence) of each inter-token gap
    while that many did.

    A request decodes from its second token to its last, as the client sees it; the batch of a gap is the
    count of requests decoding all through it. Disaggregated, a burst's KV pulls land one after another,
    so with short outputs the first requests may finish before the last joins: the plateau is then below
    the burst's size, and that is the batch the gaps are charged to.
    """
    starts = np.array([r.token_times[1] for r in records])
    ends = np.array([r.token_times[-1] for r in records])
    gaps: list[tuple[float, int, int]] = []
    for r in records:
        times = np.asarray(r.token_times[1:])
        if len(times) < 2:
            continue
        lo, hi = times[:-1], times[1:]
        batch = ((starts[None, :] <= lo[:, None]) & (ends[None, :] >= hi[:, None])).sum(axis=1)
        # Token i+1 comes from the decode step whose KV holds the prompt and tokens 0..i-1 (i = 1, 2, ...),
        # as the engine profile's DecodeSample.sum_context counts it.
        gaps += [(float(g), int(n), prompt_tokens + i) for i, (g, n) in enumerate(zip(hi - lo, batch, strict=True), 1)]
    if not gaps:
        return 0, []
    plateau = max(b for _, b, _ in gaps)
    return plateau, [(g, c) for g, b, c in gaps if b == plateau]


async def _bursts(url: str, engine: _EngineTimes, plan: ServedProbePlan, probes: _Probes, timeout: float,
                  skipped: list[str]) -> None:
    """Bursts of B requests sent together: inter-token gaps at batch B against one engine decode step."""
    tokens = plan.prompt_tokens[0]
    widest = max(plan.decode_batches)
    await _send(url, [SimRequest(0.0, tokens, plan.output_tokens)] * widest, seed=20_000, timeout=timeout)
    for batch in sorted(plan.decode_batches):
        trace = [SimRequest(0.0, tokens, plan.output_tokens)] * batch
        runs = []
        for k in range(plan.bursts):
            records = _ok(await _send(url, trace, seed=batch * 100 + k, timeout=timeout), f"burst of {batch}")
            if len(records) == batch:
                runs.append(steady_gaps(records, tokens))
        if not any(g for _, g in runs):
            skipped.append(f"decode batch {batch}: no burst whose requests all answered and left inter-token gaps")
            continue
        together = min(n for n, g in runs if g)
        gaps = [gap for n, g in runs if n == together for gap in g]
        if together < batch:
            skipped.append(f"decode batch {batch}: at most {together} of its requests decoded together (the "
                           "first finished before the last joined); measured at that batch")
        measured = statistics.median(g for g, _ in gaps)
        context = statistics.median(c for _, c in gaps)
        probes.entries.append(ServedProbe(kind="decode", batch_size=together, tokens=tokens, samples=len(gaps),
                                          measured_seconds=measured,
                                          engine_seconds=engine.decode_s(together, context)))


async def _loaded(url: str, rate: float, plan: ServedProbePlan, trace_dir: Path, timeout: float) -> LoadedSteps:
    """A Poisson trace at `rate`; the steps the worker traced while it ran."""
    trace = poisson_trace(rate, plan.load_requests, plan.prompt_tokens[0], plan.output_tokens, seed=30_000)
    began = time.time()
    _ok(await _send(url, trace, seed=30_000, timeout=timeout), "loaded")
    return loaded_steps(s for s in read_steps(trace_dir) if s.start >= began)


def _loaded_decode(engine: _EngineTimes, batches: Sequence[int], loaded: LoadedSteps,
                   tokens: int) -> list[ServedProbe]:
    """Per probed batch B, the loaded decode steps of more than the next smaller probed batch and at most B
    sequences, as their median difference from the engine's step at their own batch and context."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for period in loaded.periods:
        at = bisect.bisect_left(batches, period.batch)
        if at < len(batches):
            model = engine.decode(period.batch, period.context)
            bins.setdefault(batches[at], []).append((period.seconds - model, model))
    out = []
    for batch, pairs in sorted(bins.items()):
        if len(pairs) >= MIN_LOADED_SAMPLES:
            model = statistics.median(m for _, m in pairs)
            out.append(ServedProbe(kind="decode_loaded", batch_size=batch, tokens=tokens, samples=len(pairs),
                                   measured_seconds=max(0.0, model + statistics.median(d for d, _ in pairs)),
                                   engine_seconds=model))
    return out


def _behind_decode(engine: _EngineTimes, overhead: ServedOverhead, loaded: LoadedSteps) -> ServedProbe | None:
    """What each loaded prefill launched beside decodes added to the engine's busy time beyond its engine
    prefill: the busy stretches' time less their decode calls at the served step and their prefills at the
    engine fit, over those prefills (a stretch's opening prefill, from idle, is charged but not counted)."""
    left, prefill_s, counted, prompts, tokens = 0.0, 0.0, 0, [], []
    for st in loaded.stretches:
        left += st.seconds - sum(engine.decode(b, c) + overhead.decode_overhead_s(b) for b, c in st.decodes)
        left -= sum(engine.prefill(n, sum_sq) for _, n, sum_sq in st.prefills)
        for batch, n, sum_sq in st.beside_decodes:
            prefill_s += engine.prefill(n, sum_sq)
            counted += 1
            prompts.append(batch)
            tokens.append(n / batch)
    if counted < MIN_LOADED_SAMPLES:
        return None
    mean = prefill_s / counted
    return ServedProbe(kind="prefill_behind_decode", batch_size=max(1, round(statistics.median(prompts))),
                       tokens=max(1, round(statistics.median(tokens))), samples=counted,
                       measured_seconds=max(0.0, mean + left / counted), engine_seconds=mean)


def robust_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, b) >= 0 of a + b·x through the points, robust to a point thrown off by another job's load spike:
    Siegel's repeated median (per point, the median slope to the others; their median), then the median
    intercept; a constant where all x are equal."""
    slopes = []
    for i in range(len(x)):
        own = [(y[j] - y[i]) / (x[j] - x[i]) for j in range(len(x)) if x[j] != x[i]]
        if own:
            slopes.append(float(np.median(own)))
    slope = max(0.0, float(np.median(slopes))) if slopes else 0.0
    return max(0.0, float(np.median([yi - slope * xi for xi, yi in zip(x, y, strict=True)]))), slope


def isotonic(y: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to `y` in weighted least squares (pool-adjacent-violators): each
    run that falls is replaced by its weighted mean, so a dip between two probes is shared by them rather
    than kept."""
    if len(y) != len(weights) or min(weights, default=1.0) <= 0:
        raise ValueError(f"isotonic needs one positive weight per value, got {len(weights)} for {len(y)}")
    blocks: list[tuple[float, float, int]] = []  # (mean, weight, values) of pooled runs, means increasing
    for value, weight in zip(y, weights, strict=True):
        mean, total, count = float(value), float(weight), 1
        while blocks and blocks[-1][0] > mean:
            prev, prev_total, prev_count = blocks.pop()
            mean = (prev * prev_total + mean * total) / (prev_total + total)
            total, count = prev_total + total, prev_count + count
        blocks.append((mean, total, count))
    return [mean for mean, _, count in blocks for _ in range(count)]


def decode_table(batches: Sequence[int], differences: Sequence[float]) -> list[DecodeOverheadPoint]:
    """The per-batch decode overhead from the probes' measured - engine differences: clamped at 0 (the
    served path cannot make a step faster), probes at one batch pooled, then fitted non-decreasing in batch
    (`isotonic`) so that one noisy probe cannot make the overhead fall as the batch grows."""
    by_batch: dict[int, list[float]] = {}
    for batch, difference in zip(batches, differences, strict=True):
        by_batch.setdefault(batch, []).append(max(0.0, difference))
    ordered = sorted(by_batch)
    # One weight per probe, not per `samples`: a probe's samples are the gaps of all B requests, which see
    # the same engine steps, so a wider burst has more samples but no more independent measurements, and
    # weighting by them would let its noise drag the narrower bursts' values along.
    fitted = isotonic([statistics.fmean(by_batch[b]) for b in ordered], [len(by_batch[b]) for b in ordered])
    return [DecodeOverheadPoint(batch_size=b, seconds=s) for b, s in zip(ordered, fitted, strict=True)]


def _nonneg_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, b) >= 0 minimising Σ(a + b·x - y)²; a constant when there is one point."""
    if len(x) == 1:
        return max(0.0, float(y[0])), 0.0
    design = np.column_stack([np.ones(len(x)), np.asarray(x, dtype=float)])
    scale = np.maximum(np.abs(design).max(axis=0), 1e-30)
    coef = nnls(design / scale, np.asarray(y, dtype=float)) / scale
    return float(coef[0]), float(coef[1])


def overhead_from_probes(probes: Sequence[ServedProbe], first_gaps: dict[int, list[float]], mode: ServedMode,
                         engine: _EngineTimes, kv_bytes_per_token: float,
                         loaded: LoadedSteps | None = None) -> ServedOverhead:
    """The section's values from its probes and, colocated, the loaded trace's steps (see the module doc)."""
    prefill = [p for p in probes if p.kind == "prefill"]
    bursts = sorted((p for p in probes if p.kind == "decode"), key=lambda p: p.batch_size)
    if not prefill or not bursts:
        raise ServedProfileError(f"need prefill and decode probes, got {len(prefill)} and {len(bursts)}")
    main = prefill[0]
    prefill_s = max(0.0, main.measured_seconds - main.engine_seconds)
    extra: list[ServedProbe] = []
    if loaded is not None:
        extra += _loaded_decode(engine, sorted({p.batch_size for p in bursts}), loaded, main.tokens)
    # Where the load reached a probed batch, its steps are what serving sees there; bursts elsewhere.
    under_load = {p.batch_size for p in extra}
    decode = [p for p in bursts if p.batch_size not in under_load] + extra
    decode.sort(key=lambda p: p.batch_size)
    batches = [p.batch_size for p in decode]
    differences = [p.measured_seconds - p.engine_seconds for p in decode]
    step_s, per_seq_s = robust_line(batches, differences)
    decode_only = ServedOverhead(decode_step_s=step_s, decode_per_seq_s=per_seq_s,
                                 decode_by_batch=decode_table(batches, differences))
    behind = _behind_decode(engine, decode_only, loaded) if loaded is not None else None
    if behind is not None:
        extra.append(behind)
    kv_handoff_s = kv_link_gbps = None
    if mode == "disaggregated":
        lengths, rests = [], []
        for tokens, gaps in first_gaps.items():
            # The served step as the simulator charges it, so the hand-off is what is left beyond that.
            served_step = engine.decode_s(1, tokens) + decode_only.decode_overhead_s(1)
            gap = statistics.median(gaps)
            extra.append(ServedProbe(kind="kv_handoff", batch_size=1, tokens=tokens, samples=len(gaps),
                                     measured_seconds=gap, engine_seconds=served_step))
            lengths.append(tokens)
            rests.append(gap - served_step)
        if len(set(lengths)) >= 2:
            kv_handoff_s, per_token = _nonneg_line(lengths, rests)
            kv_link_gbps = kv_bytes_per_token / per_token / 1e9 if per_token > 0 else None
    behind_s = None if behind is None else float(np.clip(behind.measured_seconds - behind.engine_seconds, -1.0, 1.0))
    return ServedOverhead(prefill_s=prefill_s, decode_step_s=step_s, decode_per_seq_s=per_seq_s,
                          decode_by_batch=decode_only.decode_by_batch, prefill_behind_decode_s=behind_s,
                          kv_handoff_s=kv_handoff_s, kv_link_gbps=kv_link_gbps, probes=[*probes, *extra])


def decode_by_batch_text(table: Sequence[DecodeOverheadPoint]) -> str:
    """The per-batch decode overhead in one short phrase, e.g. `decode +0.00/0.13 ms at batch 32/64`."""
    if not table:
        return "no per-batch decode table"
    added = "/".join(f"{p.seconds * 1e3:.2f}" for p in table)
    return f"decode +{added} ms at batch {'/'.join(str(p.batch_size) for p in table)}"


async def probe_served(url: str, engine_profile: LatencyProfile, mode: ServedMode, plan: ServedProbePlan, *,
                       timeout: float = 900.0, log: Callable[[str], None] | None = None,
                       skipped: list[str] | None = None, step_trace: Path | None = None) -> ServedOverhead:
    """Probe the served path at `url` (a router in `mode`) and return its overheads over `engine_profile`.

    With `plan.load_rate`, colocated, also the loaded probe; `step_trace` is the directory its worker traces
    its steps into (`disagg serve --step-trace`).
    """
    say = log or (lambda _msg: None)
    engine = _EngineTimes.of(engine_profile)
    probes = _Probes()
    notes = skipped if skipped is not None else []
    await _singles(url, engine, plan, probes, timeout)
    await _bursts(url, engine, plan, probes, timeout, notes)
    loaded = None
    if mode == "colocated" and plan.load_rate is not None:
        if step_trace is None:
            raise ValueError("a loaded probe reads the worker's step trace: pass the directory it writes to")
        loaded = await _loaded(url, plan.load_rate, plan, step_trace, timeout)
        beside = sum(len(st.beside_decodes) for st in loaded.stretches)
        if beside < MIN_LOADED_SAMPLES:
            notes.append(f"prefill behind decode: {beside} prefills launched beside decodes at {plan.load_rate:g} "
                         f"req/s, {MIN_LOADED_SAMPLES} needed; raise the load rate or requests")
    served = overhead_from_probes(probes.entries, probes.first_gaps, mode, engine,
                                  engine_profile.model.kv_bytes_per_token, loaded)
    for p in served.probes:
        say(f"served {mode} {p.kind:>10} batch {p.batch_size:>4} x {p.tokens:>5} tokens: measured "
            f"{p.measured_seconds * 1e3:9.2f} ms, engine {p.engine_seconds * 1e3:9.2f} ms")
    say(f"served {mode}: prefill +{served.prefill_s * 1e3:.2f} ms/request, decode step +{served.decode_step_s * 1e3:.2f}"
        f" ms + {served.decode_per_seq_s * 1e3:.3f} ms/sequence ({decode_by_batch_text(served.decode_by_batch)})"
        + (f", prefill behind decode {served.prefill_behind_decode_s * 1e3:+.2f} ms"
           if served.prefill_behind_decode_s is not None else "")
        + (f", KV hand-off +{served.kv_handoff_s * 1e3:.2f} ms" if served.kv_handoff_s is not None else ""))
    return served


def profile_served(model_dir: Path, engine_profile: LatencyProfile, modes: Sequence[ServedMode],
                   plan: ServedProbePlan, *, worker_args: Sequence[str] = (),
                   role_args: dict[str, list[str]] | None = None, cpu_affinity: dict[str, set[int]] | None = None,
                   startup_timeout_s: float = 600.0, log: Callable[[str], None] | None = None,
                   skipped: list[str] | None = None) -> LatencyProfile:
    """`engine_profile` with a `served` entry for each mode, each measured on a fresh local deployment
    (router + workers as child processes, exactly what the pods run) of `model_dir`."""
    served = dict(engine_profile.served)
    for mode in modes:
        traced = mode == "colocated" and plan.load_rate is not None
        with tempfile.TemporaryDirectory(prefix="disagg-served-steps-") if traced else nullcontext() as steps:
            trace = ["--step-trace", steps] if steps else []
            cluster = LocalCluster(model_dir=model_dir, port=0, colocated_workers=1 if mode == "colocated" else 0,
                                   worker_args=[*worker_args, *trace], role_args=dict(role_args or {}),
                                   cpu_affinity=dict(cpu_affinity or {}), startup_timeout_s=startup_timeout_s)
            with cluster:
                served[mode] = asyncio.run(probe_served(cluster.url, engine_profile, mode, plan, log=log,
                                                        skipped=skipped, step_trace=Path(steps) if steps else None))
    return engine_profile.model_copy(update={"served": served})
