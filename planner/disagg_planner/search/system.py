"""Whole-configuration measurement: place a candidate, simulate it end to end, grow it until it meets the rate.

Per-instance goodputs come from short isolated runs; the whole system (both phases, KV over the link its
placement implies, routing across replicas) can land a little below the sum of its parts. When it misses
the target rate at the target attainment, the phase that misses more (TTFT vs TPOT at that rate) gets one
more instance, while the budget and the nodes allow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..api.plan import InstancePlacement
from ..simulator import (
    ChunkedColocatedConfig,
    ColocatedConfig,
    DisaggConfig,
    PhaseShape,
    SimResult,
    simulate_colocated,
    simulate_colocated_chunked,
    simulate_disaggregated,
)
from .allocate import Candidate
from .capacity import colocated_capacity, decode_capacity, kv_link_capacity, prefill_capacity
from .chunked import chunked_capacity
from .goodput import goodput
from .placement import InstanceRequest, UnitRequest, nodes_used, pack_colocated, pack_instances, pack_units
from .problem import MEM_UTIL, SearchProblem

SystemConfig = DisaggConfig | ColocatedConfig | ChunkedColocatedConfig
MAX_GROWTH = 4  # instances added to one candidate at most
LO_FRACTION = 0.5  # of the estimate: where the bisection starts (it shrinks from there if that fails)


@dataclass(frozen=True)
class Layout:
    """The nodes a plan may use and its GPU budget."""

    nodes: int
    gpus_per_node: int
    budget: int


@dataclass(frozen=True)
class Measured:
    """A candidate after whole-system simulation (and growth): its placement, goodput and attainment at target."""

    candidate: Candidate
    placement: list[InstancePlacement]
    goodput: float
    attainment_at_target: float
    simulations: int

    def meets(self, target: float) -> bool:
        return self.attainment_at_target >= target


def place(c: Candidate, layout: Layout) -> list[InstancePlacement] | None:
    """Node and GPU indices for every stage of every instance; None when the candidate does not pack."""
    nodes, per_node = layout.nodes, layout.gpus_per_node
    if c.mode == "colocated":
        return pack_colocated(c.prefill.tp, c.prefill.pp, c.n_prefill, nodes, per_node)
    if c.affinity == "low":
        return pack_units(UnitRequest(c.prefill.tp, c.decode.tp, c.prefill.pp, c.n_prefill), nodes, per_node)
    return pack_instances(
        [InstanceRequest("prefill", c.prefill.tp, c.prefill.pp, c.n_prefill),
         InstanceRequest("decode", c.decode.tp, c.decode.pp, c.n_decode)],
        nodes, per_node,
    )


def config(problem: SearchProblem, c: Candidate, placement: list[InstancePlacement]) -> SystemConfig:
    """The simulator configuration of a placed candidate."""
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
    kv_link = p.intra_node_gbps if nodes_used(placement) == 1 else p.inter_node_gbps
    return DisaggConfig(prefill, decode, kv_link, p.token_budget, MEM_UTIL)


def rate_bound(problem: SearchProblem, c: Candidate) -> float:
    """Steady-state capacity of the whole candidate: replicas x instance capacity of its slower phase."""
    p, lat, stats = problem, problem.latency, problem.stats
    if c.mode == "colocated":
        link = p.stage_link(c.prefill.gpus)
        bound = chunked_capacity if c.chunk_budget else colocated_capacity
        one = bound(lat, c.prefill, stats, p.token_budget, p.tpot_s, link, MEM_UTIL)
        return c.n_prefill * one
    together = (c.prefill.tp + c.decode.tp) * c.prefill.pp if c.affinity == "low" else c.decode.gpus
    pre = c.n_prefill * prefill_capacity(lat, c.prefill, stats, p.token_budget)
    kv_link = p.intra_node_gbps if c.affinity == "low" else p.inter_node_gbps
    one = min(decode_capacity(lat, c.decode, stats, p.tpot_s, p.stage_link(together), MEM_UTIL),
              kv_link_capacity(lat, stats, kv_link))
    return min(pre, c.n_decode * one)


def simulate(problem: SearchProblem, cfg: SystemConfig, rate: float, count: int) -> SimResult:
    """One whole-system run at `rate` req/s over the first `count` requests of the sample."""
    requests = problem.at_rate(rate, count)
    if isinstance(cfg, DisaggConfig):
        return simulate_disaggregated(cfg, problem.latency, requests)
    if isinstance(cfg, ChunkedColocatedConfig):
        return simulate_colocated_chunked(cfg, problem.latency, requests)
    return simulate_colocated(cfg, problem.latency, requests)


def measure(problem: SearchProblem, layout: Layout, candidate: Candidate) -> Measured | None:
    """Fit the candidate to the target rate by whole-system runs, then find its goodput. None if it does not pack.

    Replica counts come from isolated instances; together they may do better (several prefill instances
    share one queue's bursts) or worse (KV transfer, routing). So: while the system meets the target at the
    target rate, drop an instance of the phase with the most slack; while it misses, add one to the phase
    that misses more. Each step is one run at the target rate; one bisection measures the result.
    """
    placement = place(candidate, layout)
    if placement is None:
        return None
    runs = 0

    def at_target(c: Candidate, where: list[InstancePlacement]) -> SimResult:
        nonlocal runs
        runs += 1
        cfg = config(problem, c, where)
        return simulate(problem, cfg, problem.target_rate, problem.system_requests(rate_bound(problem, c)))

    result = at_target(candidate, placement)
    if problem.attainment(result) >= problem.target:
        while (smaller := _shrink(problem, candidate, result, layout, at_target)) is not None:
            candidate, placement, result = smaller
    else:
        for _ in range(MAX_GROWTH):
            bigger = _grow(problem, candidate, result, layout)
            if bigger is None:
                break
            candidate, placement = bigger
            result = at_target(candidate, placement)
            if problem.attainment(result) >= problem.target:
                break
    found, more = _goodput(problem, candidate, placement, result)
    return Measured(candidate, placement, found, problem.attainment(result), runs + more)


def _goodput(
    problem: SearchProblem, c: Candidate, placement: list[InstancePlacement], at_target: SimResult
) -> tuple[float, int]:
    """Bisection on rate for the whole configuration, reusing the run at the target rate."""
    bound = rate_bound(problem, c)
    if bound <= 0:
        return 0.0, 0
    cfg, count = config(problem, c, placement), problem.system_requests(bound)
    seen: dict[float, float] = {problem.target_rate: problem.attainment(at_target)}

    def attainment(rate: float) -> float:
        if rate not in seen:
            seen[rate] = problem.attainment(simulate(problem, cfg, rate, count))
        return seen[rate]

    estimate = min(c.estimate, bound)
    start = problem.target_rate if attainment(problem.target_rate) >= problem.target else LO_FRACTION * estimate
    found = goodput(attainment, problem.target, min(start, 0.99 * bound), bound, rel_tol=problem.rel_tol,
                    max_expand=0)
    return found, len(seen) - 1


def _with_counts(c: Candidate, n_prefill: int, n_decode: int) -> Candidate:
    if c.mode == "colocated":
        return replace(c, n_prefill=n_prefill, gpus=n_prefill * c.prefill.gpus,
                       estimate=n_prefill * c.prefill_goodput)
    return replace(c, n_prefill=n_prefill, n_decode=n_decode,
                   gpus=n_prefill * c.prefill.gpus + n_decode * c.decode.gpus,
                   estimate=min(n_prefill * c.prefill_goodput, n_decode * c.decode_goodput))


def _phase_steps(problem: SearchProblem, c: Candidate, result: SimResult) -> list[tuple[int, int]]:
    """Count changes (prefill, decode) of one step, most-missing phase first (colocated and units: together)."""
    if c.mode == "colocated":
        return [(1, 0)]
    if c.affinity == "low":
        return [(1, 1)]
    ttft_ok = problem.attainment(result, tpot_s=math.inf)
    tpot_ok = problem.attainment(result, ttft_s=math.inf)
    return [(1, 0), (0, 1)] if ttft_ok <= tpot_ok else [(0, 1), (1, 0)]


RunAtTarget = Callable[[Candidate, list[InstancePlacement]], SimResult]


def _shrink(
    problem: SearchProblem, c: Candidate, result: SimResult, layout: Layout, at_target: RunAtTarget
) -> tuple[Candidate, list[InstancePlacement], SimResult] | None:
    """One instance fewer of the phase with the most slack that still meets the target; None if neither does."""
    for dp, dd in reversed(_phase_steps(problem, c, result)):
        if c.n_prefill - dp < 1 or (c.mode == "disaggregated" and c.n_decode - dd < 1):
            continue
        smaller = _with_counts(c, c.n_prefill - dp, c.n_decode - dd)
        placement = place(smaller, layout)
        if placement is None:
            continue
        trial = at_target(smaller, placement)
        if problem.attainment(trial) >= problem.target:
            return smaller, placement, trial
    return None


def _grow(
    problem: SearchProblem, c: Candidate, result: SimResult, layout: Layout
) -> tuple[Candidate, list[InstancePlacement]] | None:
    """One more instance (a unit for low affinity) of the phase that misses more; None past budget or nodes."""
    dp, dd = _phase_steps(problem, c, result)[0]
    bigger = replace(_with_counts(c, c.n_prefill + dp, c.n_decode + dd), grown=c.grown + 1)
    if bigger.gpus > layout.budget:
        return None
    placement = place(bigger, layout)
    return None if placement is None else (bigger, placement)
