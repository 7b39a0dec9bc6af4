"""Whole-configuration measurement: place a candidate, fit its replica counts to the rate, measure it whole.

Replica counts come from arithmetic on per-instance goodputs (allocate.py); the whole system (both phases,
KV over the link its placement implies, routing across replicas) can do better (replicas share bursts) or
worse (KV transfer). One run at the target rate checks it, on a sample whose size is bounded whatever the
cluster (problem.system_requests), and the counts move by what that check and the capacity bounds say:

* it meets the target: each phase's count is bisected down towards the fewest instances whose capacity
  still covers the rate (fewer can never meet it), so shrinking costs O(log replicas) runs, not one per
  instance;
* it misses: counts first jump to what the capacity bounds require, then the phase that misses more
  gets one instance at a time, up to MAX_GROWTH runs, while the budget and the nodes allow.

Goodput and attainment at target then come from the estimator (estimator.py), reusing these runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..api.plan import InstancePlacement
from ..simulator import ChunkedColocatedConfig, ColocatedConfig, DisaggConfig, PhaseShape, SimResult
from .allocate import Candidate
from .estimator import SystemConfig, SystemCurve, estimate_system, instance_bounds, simulate
from .placement import InstanceRequest, UnitRequest, nodes_used, pack_colocated, pack_instances, pack_units
from .problem import MEM_UTIL, SearchProblem

__all__ = ["Fitted", "Layout", "Measured", "SystemConfig", "config", "estimate", "fit", "place", "rate_bound", "simulate"]

MAX_GROWTH = 4  # one-instance growth steps per candidate, at most


@dataclass(frozen=True)
class Layout:
    """The nodes a plan may use and its GPU budget."""

    nodes: int
    gpus_per_node: int
    budget: int


@dataclass(frozen=True)
class Measured:
    """A candidate after fitting: its placement, simulator config, capacity bound, goodput and attainment."""

    candidate: Candidate
    placement: list[InstancePlacement]
    config: SystemConfig
    bound: float
    goodput: float
    attainment_at_target: float
    simulations: int

    def meets(self, target: float) -> bool:
        return self.attainment_at_target >= target


def place(c: Candidate, layout: Layout) -> list[InstancePlacement] | None:
    """Node and GPU indices for every stage of every instance; None when the candidate does not pack."""
    nodes, per_node = layout.nodes, layout.gpus_per_node
    if c.gpus > nodes * per_node:
        return None
    if c.mode == "colocated":
        return pack_colocated(c.prefill.tp, c.prefill.pp, c.n_prefill, nodes, per_node)
    if c.affinity == "low":
        return pack_units(UnitRequest(c.prefill.tp, c.decode.tp, c.prefill.pp, c.n_prefill), nodes, per_node)
    return pack_instances(
        [InstanceRequest("prefill", c.prefill.tp, c.prefill.pp, c.n_prefill),
         InstanceRequest("decode", c.decode.tp, c.decode.pp, c.n_decode)],
        nodes, per_node,
    )


def config(problem: SearchProblem, c: Candidate, placement: list[InstancePlacement] | None) -> SystemConfig:
    """The simulator configuration of a candidate (placed: its KV link follows the nodes it spans)."""
    p = problem
    if c.mode == "colocated":
        shape = PhaseShape(c.prefill.tp, c.prefill.pp, c.n_prefill, p.stage_link(c.prefill.gpus))
        if c.chunk_budget:
            return ChunkedColocatedConfig(shape, c.chunk_budget, MEM_UTIL)
        return ColocatedConfig(shape, p.token_budget, MEM_UTIL)
    if c.affinity == "low":
        link = p.stage_link((c.prefill.tp + c.decode.tp) * c.prefill.pp)
        prefill = PhaseShape(c.prefill.tp, c.prefill.pp, c.n_prefill, link)
        decode = PhaseShape(c.decode.tp, c.decode.pp, c.n_decode, link)
        return DisaggConfig(prefill, decode, p.intra_node_gbps, p.token_budget, MEM_UTIL)
    prefill = PhaseShape(c.prefill.tp, c.prefill.pp, c.n_prefill, p.stage_link(c.prefill.gpus))
    decode = PhaseShape(c.decode.tp, c.decode.pp, c.n_decode, p.stage_link(c.decode.gpus))
    # All on one node: KV moves over NVLink; otherwise plan for the network (a pair may still share a node).
    one_node = placement is not None and nodes_used(placement) == 1
    kv_link = p.intra_node_gbps if one_node else p.inter_node_gbps
    return DisaggConfig(prefill, decode, kv_link, p.token_budget, MEM_UTIL)


def rate_bound(problem: SearchProblem, c: Candidate) -> float:
    """Steady-state capacity of the whole candidate, KV over the network (see estimator.config_bound)."""
    pre, dec = instance_bounds(problem, config(problem, c, None))
    if c.mode == "colocated":
        return c.n_prefill * pre
    return min(c.n_prefill * pre, c.n_decode * dec)


@dataclass
class _Fit:
    """The candidate being fitted, where it sits, and its rate curve (runs on discarded curves: `earlier`)."""

    candidate: Candidate
    placement: list[InstancePlacement]
    curve: SystemCurve
    earlier: int = 0

    @property
    def runs(self) -> int:
        return self.earlier + self.curve.runs

    def keep(self, trial: _Fit) -> _Fit:
        """`trial` replaces this fit; this one's runs still count."""
        trial.earlier = self.runs
        return trial

    def drop(self, trial: _Fit) -> None:
        """`trial` is discarded; its runs still count."""
        self.earlier += trial.curve.runs


@dataclass(frozen=True)
class Fitted:
    """A candidate whose counts were fitted to the target rate, before its goodput is estimated.

    `seen` holds the attainments its rate curve measured (so the estimate reuses them); `earlier` counts the
    runs on curves discarded while fitting. Whether it meets the target is known already.
    """

    candidate: Candidate
    placement: list[InstancePlacement]
    config: SystemConfig
    seen: dict[float, float]
    attainment_at_target: float
    earlier: int

    def meets(self, target: float) -> bool:
        return self.attainment_at_target >= target


def fit(problem: SearchProblem, layout: Layout, candidate: Candidate, bisect: bool = False) -> Fitted | None:
    """Fit the candidate's counts to the target rate (see the module doc; `bisect`: see _shrink). None if it
    does not pack."""
    placement = place(candidate, layout)
    if placement is None:
        return None
    fitting = _Fit(candidate, placement, SystemCurve(problem, config(problem, candidate, placement)))
    fitting = _shrink(problem, layout, fitting, bisect) if _passes(problem, fitting) else _grow(problem, layout, fitting)
    curve = fitting.curve
    return Fitted(fitting.candidate, fitting.placement, curve.cfg, dict(curve.seen), curve(problem.target_rate),
                  fitting.earlier)


def estimate(problem: SearchProblem, fitted: Fitted) -> Measured:
    """Goodput and attainment at target of a fitted candidate, on the curve its fitting measured."""
    curve = SystemCurve(problem, fitted.config)
    curve.seen.update(fitted.seen)
    est = estimate_system(problem, fitted.config, guess=fitted.candidate.estimate, curve=curve)
    return Measured(fitted.candidate, fitted.placement, fitted.config, curve.bound, est.goodput,
                    est.attainment_at_target, fitted.earlier + est.runs)


def _passes(problem: SearchProblem, fit: _Fit) -> bool:
    return fit.curve(problem.target_rate) >= problem.target


def _fitted(problem: SearchProblem, layout: Layout, c: Candidate) -> _Fit | None:
    placement = place(c, layout)
    if placement is None:
        return None
    return _Fit(c, placement, SystemCurve(problem, config(problem, c, placement)))


def _counts(c: Candidate) -> tuple[int, int]:
    return c.n_prefill, c.n_decode


def _with_counts(c: Candidate, n_prefill: int, n_decode: int) -> Candidate:
    if c.mode == "colocated":
        return replace(c, n_prefill=n_prefill, gpus=n_prefill * c.prefill.gpus,
                       estimate=n_prefill * c.prefill_goodput)
    return replace(c, n_prefill=n_prefill, n_decode=n_decode,
                   gpus=n_prefill * c.prefill.gpus + n_decode * c.decode.gpus,
                   estimate=min(n_prefill * c.prefill_goodput, n_decode * c.decode_goodput))


def _least_counts(problem: SearchProblem, fit: _Fit) -> tuple[int, int]:
    """Fewest instances of each phase whose capacity covers the target rate (below them it cannot pass)."""
    pre, dec = instance_bounds(problem, fit.curve.cfg)
    rate = problem.target_rate
    need_p = math.ceil(rate / pre) if pre > 0 else math.inf
    need_d = math.ceil(rate / dec) if dec > 0 else math.inf
    c = fit.candidate
    if c.mode == "colocated":
        return need_p, 0
    if c.affinity == "low":  # units: one prefill and one decode instance each
        both = max(need_p, need_d)
        return both, both
    return need_p, need_d


def _phase_order(problem: SearchProblem, fit: _Fit) -> list[str]:
    """Phases to change, the one missing more at the target rate first (units and colocated: one knob)."""
    c = fit.candidate
    if c.mode == "colocated" or c.affinity == "low":
        return ["both"]
    rate = problem.target_rate
    result: SimResult | None = fit.curve.results.get(rate)
    if result is None:  # overloaded by the bound: the phase whose capacity falls short misses more
        pre, dec = instance_bounds(problem, fit.curve.cfg)
        return ["prefill", "decode"] if c.n_prefill * pre <= c.n_decode * dec else ["decode", "prefill"]
    ttft_ok = problem.attainment(result, tpot_s=math.inf)
    tpot_ok = problem.attainment(result, ttft_s=math.inf)
    return ["prefill", "decode"] if ttft_ok <= tpot_ok else ["decode", "prefill"]


def _set(c: Candidate, phase: str, count: int) -> Candidate:
    if phase == "prefill":
        return _with_counts(c, count, c.n_decode)
    if phase == "decode":
        return _with_counts(c, c.n_prefill, count)
    return _with_counts(c, count, count if c.mode == "disaggregated" else 0)


def _count(c: Candidate, phase: str) -> int:
    return c.n_decode if phase == "decode" else c.n_prefill


def _shrink(problem: SearchProblem, layout: Layout, fit: _Fit, bisect: bool = False) -> _Fit:
    """Fit each phase's count down (most slack first) to the fewest that still meet the target.

    The capacity bound's count is tried first: most candidates pass there, and then no count below can, so
    one run replaces the bisection's ~log2(range). When it misses, the bisection runs as before, reusing
    that run should it probe the same count. `bisect` is the reference path: bisection only. The two agree
    wherever attainment at target rises with the count; where it does not, the first path keeps a passing
    count no larger than the bisection's (tests/planner/test_search_reference_paths.py).
    """
    least_p, least_d = _least_counts(problem, fit)
    for phase in reversed(_phase_order(problem, fit)):
        lo, hi = max(1, least_d if phase == "decode" else least_p), _count(fit.candidate, phase)
        tried: dict[int, _Fit | None] = {}
        if not bisect and lo < hi:
            first = tried[lo] = _fitted(problem, layout, _set(fit.candidate, phase, lo))
            if first is not None and _passes(problem, first):
                fit = fit.keep(first)
                continue
        while lo < hi:  # hi passes; below the capacity bound's count nothing can
            mid = (lo + hi) // 2
            trial = tried.pop(mid) if mid in tried else _fitted(problem, layout, _set(fit.candidate, phase, mid))
            if trial is not None and _passes(problem, trial):
                fit, hi = fit.keep(trial), mid
            else:
                if trial is not None:
                    fit.drop(trial)
                lo = mid + 1
        for unused in tried.values():
            if unused is not None:
                fit.drop(unused)
    return fit


def _grow(problem: SearchProblem, layout: Layout, fit: _Fit) -> _Fit:
    """Jump to the counts the capacity bounds require, then one instance at a time while it misses."""
    least_p, least_d = _least_counts(problem, fit)
    c = fit.candidate
    if math.isfinite(least_p) and math.isfinite(least_d):
        jump = _with_counts(c, max(c.n_prefill, least_p), max(c.n_decode, least_d))
        if _counts(jump) != _counts(c) and jump.gpus <= layout.budget:
            trial = _fitted(problem, layout, replace(jump, grown=c.grown + 1))
            if trial is not None:
                fit = fit.keep(trial)
                if _passes(problem, fit):
                    return fit
    for _ in range(MAX_GROWTH):
        c = fit.candidate
        phase = _phase_order(problem, fit)[0]
        bigger = replace(_set(c, phase, _count(c, phase) + 1), grown=c.grown + 1)
        if bigger.gpus > layout.budget:
            break
        trial = _fitted(problem, layout, bigger)
        if trial is None:
            break
        fit = fit.keep(trial)
        if _passes(problem, fit):
            break
    return fit
