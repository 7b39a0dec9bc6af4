"""Replaying a Plan in the simulator: its configuration, and its SLO attainment over a sweep of rates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..api.plan import Plan
from ..api.profile import LatencyProfile
from ..api.spec import DisaggServingSpec
from ..errors import PlannerError
from ..simulator import ChunkedColocatedConfig, ColocatedConfig, DisaggConfig, PhaseShape
from .estimator import SystemConfig, SystemCurve, simulate
from .latency_source import latency_model
from .problem import MEM_UTIL, WARMUP_SHARE, SearchProblem


@dataclass(frozen=True)
class RatePoint:
    """Steady-state attainment of a plan at one arrival rate (both SLOs, and each alone)."""

    rate: float
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    p90_ttft_s: float
    p90_tpot_s: float
    beyond_capacity: bool = False  # past the plan's capacity bound: no steady state, attainment taken as 0


def plan_config(problem: SearchProblem, plan: Plan) -> SystemConfig:
    """The simulator configuration a plan describes (links as the search assumed them)."""
    p = problem
    if plan.mode == "colocated":
        if plan.colocated is None:
            raise PlannerError("a colocated plan needs its `colocated` phase")
        c = plan.colocated
        shape = PhaseShape(c.tp, c.pp, c.replicas, p.stage_link(c.tp * c.pp))
        if plan.colocated_prefill == "chunked":
            if plan.chunk_token_budget is None:
                raise PlannerError("a chunked-prefill colocated plan needs its `chunkTokenBudget`")
            return ChunkedColocatedConfig(shape, plan.chunk_token_budget, MEM_UTIL)
        return ColocatedConfig(shape, p.token_budget,
                               MEM_UTIL)
    if plan.prefill is None or plan.decode is None:
        raise PlannerError("a disaggregated plan needs both `prefill` and `decode` phases")
    pre, dec = plan.prefill, plan.decode
    if plan.affinity == "low":
        link = p.stage_link((pre.tp + dec.tp) * pre.pp)
        return DisaggConfig(PhaseShape(pre.tp, pre.pp, pre.replicas, link), PhaseShape(dec.tp, dec.pp, dec.replicas, link),
                            p.intra_node_gbps, p.token_budget, MEM_UTIL)
    one_node = len({s.node for s in plan.placement}) <= 1
    return DisaggConfig(
        PhaseShape(pre.tp, pre.pp, pre.replicas, p.stage_link(pre.tp * pre.pp)),
        PhaseShape(dec.tp, dec.pp, dec.replicas, p.stage_link(dec.tp * dec.pp)),
        p.intra_node_gbps if one_node else p.inter_node_gbps, p.token_budget, MEM_UTIL,
    )


def attainment_curve(
    spec: DisaggServingSpec, plan: Plan, rates: list[float], profile: LatencyProfile | None = None, seed: int = 0,
) -> list[RatePoint]:
    """Simulate the plan at each rate, as the planner's estimator does (estimator.py).

    The same request sample and count per rate as the search's rate curve, so the point at the plan's
    target rate is the plan's predicted attainment. Past the plan's capacity bound every attainment is 0
    (`beyond_capacity`; the finite run's p90 latencies are still shown).
    """
    problem = SearchProblem.of(spec, latency_model(spec, profile), seed)
    cfg = plan_config(problem, plan)
    curve = SystemCurve(problem, cfg)
    points = []
    for rate in rates:
        result = simulate(problem, cfg, rate, curve.count)
        skip = int(result.num_requests * WARMUP_SHARE)
        over = rate > curve.bound
        points.append(RatePoint(
            rate=rate,
            attainment=0.0 if over else problem.attainment(result),
            ttft_attainment=0.0 if over else problem.attainment(result, tpot_s=float("inf")),
            tpot_attainment=0.0 if over else problem.attainment(result, ttft_s=float("inf")),
            p90_ttft_s=float(_p90(result.ttfts[skip:])),
            p90_tpot_s=float(_p90(result.tpots[skip:])),
            beyond_capacity=over,
        ))
    return points


def _p90(values: np.ndarray) -> float:
    return float(np.percentile(values, 90)) if len(values) else 0.0
