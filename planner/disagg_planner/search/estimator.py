"""The one goodput estimator: every goodput, attainment and per-instance rate the planner reports comes from here.

A configuration's *rate curve* is its steady-state SLO attainment as a function of the arrival rate, on one
seed's trace: the seed's unit-rate request sample (problem.py), scaled to the rate, every run a prefix of it
(so one trace per rate and seed). The curve is memoised per rate, so every question asked about a rate, by
the bisection, by the growth loop or by the report, gets the same answer.

Past the configuration's closed-form capacity (capacity.py) a queue grows without bound, so the steady-state
attainment there is 0, whatever a finite run shows; the curve says so without simulating. This is what makes
the two reported numbers agree: a finite run slightly past capacity still passes (the backlog has not built
up yet), while the bisection, capped at capacity, could not find a goodput that high.

Goodput is searched from an anchor (the target rate): when the curve passes there, goodput is at least the
anchor; when it fails, below it. So for every plan: goodput >= target rate exactly when attainment at the
target rate >= the attainment target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..simulator import (
    ChunkedColocatedConfig,
    ColocatedConfig,
    DisaggConfig,
    SimResult,
    simulate_colocated,
    simulate_colocated_chunked,
    simulate_disaggregated,
)
from ..simulator.types import PhaseShape
from .capacity import colocated_capacity, decode_capacity, kv_link_capacity, prefill_capacity
from .chunked import chunked_capacity
from .goodput import goodput
from .problem import SearchProblem
from .shapes import Shape

SystemConfig = DisaggConfig | ColocatedConfig | ChunkedColocatedConfig
# When the anchor fails, the search restarts this far below it (it shrinks further from there if that fails).
BELOW_ANCHOR = 0.5


def simulate(problem: SearchProblem, cfg: SystemConfig, rate: float, count: int) -> SimResult:
    """One whole-system run at `rate` req/s over the first `count` requests of the problem's sample."""
    requests = problem.at_rate(rate, count)
    if isinstance(cfg, DisaggConfig):
        return simulate_disaggregated(cfg, problem.latency, requests)
    if isinstance(cfg, ChunkedColocatedConfig):
        return simulate_colocated_chunked(cfg, problem.latency, requests)
    return simulate_colocated(cfg, problem.latency, requests)


def _shape(phase: PhaseShape) -> Shape:
    return Shape(phase.tp, phase.pp)


def _link(problem: SearchProblem, phase: PhaseShape) -> float:
    return phase.stage_link_gbps or problem.intra_node_gbps


def instance_bounds(problem: SearchProblem, cfg: SystemConfig) -> tuple[float, float]:
    """Capacity (req/s) of ONE instance of each phase of `cfg`: (prefill, decode), or (colocated, colocated)."""
    lat, stats = problem.latency, problem.stats
    if isinstance(cfg, ChunkedColocatedConfig):
        one = chunked_capacity(lat, _shape(cfg.shape), stats, problem.token_budget, problem.tpot_s,
                               _link(problem, cfg.shape), cfg.mem_util)
        return one, one
    if isinstance(cfg, ColocatedConfig):
        one = colocated_capacity(lat, _shape(cfg.shape), stats, cfg.prefill_token_budget, problem.tpot_s,
                                 _link(problem, cfg.shape), cfg.mem_util)
        return one, one
    pre = prefill_capacity(lat, _shape(cfg.prefill), stats, cfg.prefill_token_budget)
    dec = min(decode_capacity(lat, _shape(cfg.decode), stats, problem.tpot_s, _link(problem, cfg.decode),
                              cfg.mem_util),
              kv_link_capacity(lat, stats, cfg.kv_link_gbps))
    return pre, dec


def config_bound(problem: SearchProblem, cfg: SystemConfig) -> float:
    """Steady-state capacity of the whole configuration: replicas x instance capacity of its slower phase."""
    pre, dec = instance_bounds(problem, cfg)
    if isinstance(cfg, ColocatedConfig | ChunkedColocatedConfig):
        return cfg.shape.instances * pre
    return min(cfg.prefill.instances * pre, cfg.decode.instances * dec)


class RateCurve:
    """Attainment vs rate of one configuration on one seed's trace (memoised; 0 past capacity)."""

    def __init__(self, attain: Callable[[float], float], bound: float) -> None:
        self._attain = attain
        self.bound = bound
        self.seen: dict[float, float] = {}

    def __call__(self, rate: float) -> float:
        if rate > self.bound:
            return 0.0  # no steady state past capacity: the backlog, and every request's wait, grows
        if rate not in self.seen:
            self.seen[rate] = self._attain(rate)
        return self.seen[rate]

    @property
    def runs(self) -> int:
        return len(self.seen)


class SystemCurve(RateCurve):
    """The rate curve of a whole configuration, keeping each run's result (the growth loop reads its phases)."""

    def __init__(self, problem: SearchProblem, cfg: SystemConfig, bound: float | None = None) -> None:
        self.problem, self.cfg = problem, cfg
        bound = config_bound(problem, cfg) if bound is None else bound
        # One request count for every rate of this configuration: enough lifetimes at its capacity, bounded.
        self.count = problem.system_requests(bound)
        self.results: dict[float, SimResult] = {}
        super().__init__(self._run, bound)

    def _run(self, rate: float) -> float:
        result = simulate(self.problem, self.cfg, rate, self.count)
        self.results[rate] = result
        return self.problem.attainment(result)


def search_goodput(curve: RateCurve, target: float, *, anchor: float | None, guess: float, rel_tol: float,
                   lo_fraction: float = BELOW_ANCHOR) -> float:
    """Highest rate the curve passes at, to within `rel_tol`, never above the curve's capacity bound.

    With an `anchor`, the answer is >= anchor exactly when curve(anchor) passes (see the module doc).
    Without one, the bracket is [lo_fraction x guess, bound].
    """
    bound = curve.bound
    if bound <= 0:
        return 0.0
    if anchor is None:
        # The bracket's top sits just past the bound, where the curve is 0 without a run: an isolated
        # instance rarely passes at its (loose) bound, so probing the bound itself would waste a run.
        lo = min(lo_fraction * guess, 0.99 * bound) if guess > 0 else lo_fraction * bound
        return goodput(curve, target, lo, bound * (1 + rel_tol), rel_tol=rel_tol, max_expand=0)
    if curve(anchor) >= target:
        if anchor >= bound:
            return anchor
        return goodput(curve, target, anchor, bound, rel_tol=rel_tol, max_expand=0)
    start = lo_fraction * min(guess if guess > 0 else anchor, anchor, bound)
    return goodput(curve, target, start, anchor, rel_tol=rel_tol, max_expand=0)


@dataclass(frozen=True)
class Estimate:
    """A configuration's goodput and its attainment at the target rate, on one seed's trace."""

    goodput: float
    attainment_at_target: float
    runs: int


def estimate_system(problem: SearchProblem, cfg: SystemConfig, *, guess: float = 0.0,
                    curve: SystemCurve | None = None) -> Estimate:
    """Goodput (anchored at the target rate) and attainment at target of a whole configuration.

    This is the estimator every serving mode's plan goes through; pass the `curve` already used (e.g. by
    a replica-fitting loop) so that its runs are reused, not repeated.
    """
    curve = curve if curve is not None else SystemCurve(problem, cfg)
    found = search_goodput(curve, problem.target, anchor=problem.target_rate, guess=guess or curve.bound,
                           rel_tol=problem.rel_tol)
    return Estimate(found, curve(problem.target_rate), curve.runs)


def seed_goodput(problem: SearchProblem, cfg: SystemConfig, bound: float, near: float) -> float:
    """Goodput of `cfg` on the problem's seed, searched from `near` (the goodput another seed gave).

    The same curve and bisection as a plan's own goodput, bracketed where the answer is likely to be:
    [near, near x (1 + 2 tol)] or [near / (1 + 2 tol), near] first, so a seed whose goodput is close costs
    two or three runs, and one whose goodput is the capacity bound one run.
    """
    curve = SystemCurve(problem, cfg, bound)
    target, tol = problem.target, problem.rel_tol
    step = 1 + 2 * tol
    if near <= 0:
        return search_goodput(curve, target, anchor=None, guess=bound, rel_tol=tol)
    if curve(near) >= target:
        if near >= bound:
            return near
        hi = min(bound, near * step)
        if curve(hi) >= target:
            return hi if hi >= bound else goodput(curve, target, hi, bound, rel_tol=tol, max_expand=0)
        return goodput(curve, target, near, hi, rel_tol=tol, max_expand=0)
    return goodput(curve, target, near / step, near, rel_tol=tol, max_expand=0)


# Two-sided 90% Student t quantiles (0.95 one-sided) by degrees of freedom; numpy has no t distribution.
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
COVERAGE = 0.9


def prediction_interval(samples: list[float], point: float, bound: float, rel_tol: float) -> tuple[float, float]:
    """90% prediction interval for one more draw, from `samples` (one goodput per seed).

    mean +- t(0.95, n-1) x sd x sqrt(1 + 1/n) (normal draws); widened by `rel_tol` on each side because each
    goodput is only resolved to within it (the bisection stops there), and kept around `point` (the plan's
    own goodput) and below `bound` (no goodput exceeds capacity).
    """
    n = len(samples)
    mean = sum(samples) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1)) if n > 1 else 0.0
    half = _T95.get(n - 1, 1.645) * sd * math.sqrt(1 + 1 / n)
    low = max(0.0, min(mean - half, point) / (1 + rel_tol))
    high = min(max(mean + half, point) * (1 + rel_tol), max(bound, point))
    return low, high
