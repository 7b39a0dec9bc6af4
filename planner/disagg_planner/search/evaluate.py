"""Goodput of ONE instance shape serving one phase in isolation, by simulation and bisection on rate.

These are the units of work the search farms out to worker processes, so they are plain module-level
functions of picklable arguments.

Isolation (DistServe §4.1): a prefill instance is judged on TTFT alone, with requests that stop after their
first token (no decode work at all); a decode instance on TPOT alone, fed by enough prefill instances of
its own shape to keep them at most half busy, over the KV link it will have in the plan, so that only its
own batching, memory and link decide the result. A colocated instance is judged on both SLOs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..simulator import (
    ChunkedColocatedConfig,
    ColocatedConfig,
    DisaggConfig,
    PhaseShape,
    simulate_colocated,
    simulate_colocated_chunked,
    simulate_disaggregated,
)
from .capacity import colocated_capacity, decode_capacity, kv_link_capacity, prefill_capacity
from .chunked import chunked_capacity
from .estimator import RateCurve, search_goodput
from .problem import IDEAL_LINK_GBPS, MEM_UTIL, SearchProblem
from .shapes import Shape

Kind = Literal["prefill", "decode", "colocated", "colocated-chunked"]
# The bisection brackets goodput in [LO_FRACTION, 1] x the capacity bound. Past capacity a queue only
# grows; a finite run would still pass there, so the bound is a ceiling, never extrapolated.
LO_FRACTION = 0.3


@dataclass(frozen=True)
class PhaseTask:
    """Find the goodput of ONE instance of `shape` serving phase `kind`.

    `link` joins its pipeline stages; `kv_link` (decode only) is the link its KV cache arrives over;
    `chunk_budget` (colocated-chunked only) the tokens of one mixed step.
    """

    kind: Kind
    shape: Shape
    link: float
    kv_link: float = IDEAL_LINK_GBPS
    chunk_budget: int = 0


@dataclass(frozen=True)
class PhaseResult:
    task: PhaseTask
    goodput: float  # req/s of one instance
    simulations: int


def capacity(problem: SearchProblem, task: PhaseTask) -> float:
    """Steady-state rate bound of the task's instance (see capacity.py)."""
    lat, stats, shape = problem.latency, problem.stats, task.shape
    if task.kind == "prefill":
        return prefill_capacity(lat, shape, stats, problem.token_budget)
    if task.kind == "decode":
        return min(decode_capacity(lat, shape, stats, problem.tpot_s, task.link, MEM_UTIL),
                   kv_link_capacity(lat, stats, task.kv_link))
    if task.kind == "colocated-chunked":
        return chunked_capacity(lat, shape, stats, problem.token_budget, problem.tpot_s, task.link, MEM_UTIL)
    return colocated_capacity(lat, shape, stats, problem.token_budget, problem.tpot_s, task.link, MEM_UTIL)


def phase_goodput(problem: SearchProblem, task: PhaseTask) -> PhaseResult:
    """Bisection on rate over single-instance simulations of the task's phase (the plan's estimator, alone)."""
    bound = capacity(problem, task)
    if bound <= 0:
        return PhaseResult(task, 0.0, 0)
    count = problem.instance_requests(bound, _time_inside(problem, task.kind))
    curve = RateCurve(lambda rate: phase_attainment(problem, task, rate, count), bound)
    found = search_goodput(curve, problem.target, anchor=None, guess=bound, rel_tol=problem.rel_tol,
                           lo_fraction=LO_FRACTION)
    return PhaseResult(task, found, curve.runs)


def _time_inside(problem: SearchProblem, kind: Kind) -> float:
    """How long a request stays in an instance of this phase, at most (what a run must span several of)."""
    if kind == "prefill":
        return problem.ttft_s
    if kind == "decode":
        return problem.stats.mean_output * problem.tpot_s
    return problem.lifetime_s


def phase_attainment(problem: SearchProblem, task: PhaseTask, rate: float, count: int) -> float:
    """Steady-state attainment of one isolated instance at `rate` over `count` requests."""
    lat, shape = problem.latency, task.shape
    one = PhaseShape(shape.tp, shape.pp, 1, task.link)
    if task.kind == "prefill":
        cfg = DisaggConfig(one, one, IDEAL_LINK_GBPS, problem.token_budget, MEM_UTIL)
        result = simulate_disaggregated(cfg, lat, problem.at_rate(rate, count, first_token_only=True))
        return problem.attainment(result, tpot_s=math.inf)
    requests = problem.at_rate(rate, count)
    if task.kind == "decode":
        feeders = max(1, math.ceil(2 * rate / prefill_capacity(lat, shape, problem.stats, problem.token_budget)))
        feed = PhaseShape(shape.tp, shape.pp, feeders, task.link)
        cfg = DisaggConfig(feed, one, task.kv_link, problem.token_budget, MEM_UTIL)
        return problem.attainment(simulate_disaggregated(cfg, lat, requests), ttft_s=math.inf)
    if task.kind == "colocated-chunked":
        chunked = ChunkedColocatedConfig(one, task.chunk_budget, MEM_UTIL)
        return problem.attainment(simulate_colocated_chunked(chunked, lat, requests))
    colo = ColocatedConfig(one, problem.token_budget, MEM_UTIL)
    return problem.attainment(simulate_colocated(colo, lat, requests))
