"""Turning per-instance goodputs into replica counts under the GPU budget (arithmetic only, no simulation).

Each candidate's system goodput is estimated as the slower phase's replicas x instance goodput. Replicas
are the fewest that reach the target rate (DistServe: n = ceil(rate / instance goodput)); when the budget
cannot buy that many, the most goodput it can buy. Candidates are ranked by (estimate capped at the target
rate, fewer GPUs, more goodput): reaching the target comes first, then cost; at a given rate, fewest GPUs
is the highest per-GPU goodput, DistServe's objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .shapes import Segments, Shape


@dataclass(frozen=True)
class Candidate:
    """A replicated configuration and its estimated goodput (req/s)."""

    mode: Literal["disaggregated", "colocated"]
    affinity: Literal["high", "low"]
    prefill: Shape | None
    decode: Shape | None
    n_prefill: int
    n_decode: int
    prefill_goodput: float  # per instance
    decode_goodput: float
    gpus: int
    estimate: float
    grown: int = 0  # instances added after whole-system simulation (system.py)
    chunk_budget: int = 0  # colocated with chunked prefill: tokens per mixed step (0: prefill priority)

    def rank_key(self, target_rate: float) -> tuple[float, int, float]:
        """Larger is better: reaches the target rate, then fewer GPUs, then more goodput."""
        return min(self.estimate, target_rate), -self.gpus, self.estimate


def _pair(
    gp: int, vp: float, gd: int, vd: float, rate: float, budget: int
) -> tuple[int, int, float] | None:
    """Best (n_prefill, n_decode, estimate) for instance sizes gp, gd and goodputs vp, vd."""
    if vp <= 0 or vd <= 0 or gp + gd > budget:
        return None
    n, m = math.ceil(rate / vp), math.ceil(rate / vd)
    if n * gp + m * gd <= budget:
        return n, m, min(n * vp, m * vd)
    # The budget binds: for each prefill count n, the decode count that matches it (or all that is left).
    # Up to the last n whose matching decode count still fits, the estimate is n x vp and grows with n;
    # past it decode gets what is left, which only shrinks. So the best n is that one or the next: found by
    # bisection, the cost does not grow with the budget.
    top = (budget - gd) // gp

    def matched(k: int) -> int:
        return max(1, math.ceil(k * vp / vd - 1e-9))

    def fits(k: int) -> bool:
        return matched(k) * gd + k * gp <= budget

    lo, hi = 1, top  # fits(1) holds: gp + gd <= budget and matched(1) is the fewest decode instances
    if not fits(1):
        lo = hi = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    options = []
    for k in range(max(1, lo - 1), min(top, lo + 2) + 1):
        d = min((budget - k * gp) // gd, matched(k))
        if d >= 1:
            options.append((min(k * vp, d * vd), -(k * gp + d * gd), k, d))
    est, _, n, m = max(options)
    return n, m, est


def disaggregated_candidates(
    prefill: dict[Shape, float], decode: dict[Shape, float], rate: float, budget: int
) -> list[Candidate]:
    """High node-affinity: any prefill shape with any decode shape, each replicated on its own."""
    out = []
    for sp, vp in prefill.items():
        for sd, vd in decode.items():
            best = _pair(sp.gpus, vp, sd.gpus, vd, rate, budget)
            if best is not None:
                n, m, est = best
                out.append(Candidate("disaggregated", "high", sp, sd, n, m, vp, vd, n * sp.gpus + m * sd.gpus, est))
    return out


def unit_candidates(units: dict[Segments, tuple[float, float]], rate: float, budget: int) -> list[Candidate]:
    """Low node-affinity: a unit is one prefill and one decode instance sharing nodes stage by stage."""
    out = []
    for unit, (vp, vd) in units.items():
        value = min(vp, vd)
        if value <= 0 or unit.gpus > budget:
            continue
        k = math.ceil(rate / value)
        if k * unit.gpus > budget:
            k = budget // unit.gpus
        out.append(Candidate("disaggregated", "low", unit.prefill, unit.decode, k, k, vp, vd, k * unit.gpus,
                             k * value))
    return out


def colocated_candidates(colocated: dict[Shape, float], rate: float, budget: int) -> list[Candidate]:
    """The baseline: colocated instances of one shape, replicated."""
    out = []
    for shape, value in colocated.items():
        if value <= 0 or shape.gpus > budget:
            continue
        k = math.ceil(rate / value)
        if k * shape.gpus > budget:
            k = budget // shape.gpus
        out.append(Candidate("colocated", "high", shape, None, k, 0, value, 0.0, k * shape.gpus, k * value))
    return out


def ranked(candidates: list[Candidate], rate: float) -> list[Candidate]:
    """Best first; full ties go to the smaller shapes (a stable order that does not depend on the input order)."""

    def order(c: Candidate) -> tuple:
        cap, fewer, est = c.rank_key(rate)
        return (-cap, -fewer, -est, c.prefill, c.decode or Shape(0, 0), c.n_prefill)

    return sorted(candidates, key=order)
