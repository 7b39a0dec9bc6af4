"""Goodput by bisection: the highest arrival rate whose simulated SLO attainment still meets the target."""

from __future__ import annotations

import math
from collections.abc import Callable

# An interpolated probe may not land closer than this share of the bracket to either end, so that a
# lopsided attainment curve cannot stall the search at one side.
_GUARD = 0.2
# Miss rates below this count as this (a run of ~1000 requests cannot resolve less).
_MISS_FLOOR = 1e-3


def goodput(
    simulate: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    rel_tol: float = 0.03,
    max_expand: int = 4,
    max_shrink: int = 3,
    max_iter: int = 30,
) -> float:
    """Largest rate with ``simulate(rate) >= target``, to within ``rel_tol``; 0.0 if no rate tried passes.

    ``simulate`` maps a rate (req/s) to an attainment in [0, 1] and is assumed non-increasing in the rate.
    [lo, hi] is a guess at the bracket: when ``lo`` fails it is divided by 4 up to ``max_shrink`` times; when
    ``hi`` passes it doubles up to ``max_expand`` times (0: ``hi`` is a ceiling, returned if it passes).
    Inside the bracket each step interpolates where attainment crosses the target (see `_narrow`), which
    saves about a quarter of the simulations of plain bisection on the search's attainment curves.
    """
    if not 0 < target <= 1:
        raise ValueError(f"attainment target must be in (0, 1], got {target}")
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    a_lo = simulate(lo)
    if a_lo < target:
        for _ in range(max_shrink):
            hi, a_hi = lo, a_lo
            lo = lo / 4
            a_lo = simulate(lo)
            if a_lo >= target:
                return _narrow(simulate, target, (lo, a_lo), (hi, a_hi), rel_tol, max_iter)
        return 0.0
    for _ in range(max_expand + 1):
        a_hi = simulate(hi)
        if a_hi < target:
            return _narrow(simulate, target, (lo, a_lo), (hi, a_hi), rel_tol, max_iter)
        lo, a_lo, hi = hi, a_hi, hi * 2
    return lo  # still passing after every doubling: report what was shown, not an extrapolation


def _narrow(
    simulate: Callable[[float], float], target: float, low: tuple[float, float], high: tuple[float, float],
    rel_tol: float, max_iter: int,
) -> float:
    """Shrink the bracket (lo passes, hi fails) to a relative width of `rel_tol`; returns its passing end.

    Attainment stays near 1 and then falls steeply as queues build, so the miss rate (1 - attainment) grows
    roughly exponentially with the rate: the probe interpolates log(miss) linearly between the ends (kept
    away from them by a guard, and plain halving once the bracket is within a few tolerances).
    """
    (lo, a_lo), (hi, a_hi) = low, high
    log_target = math.log(1 - target) if target < 1 else math.log(_MISS_FLOOR)
    for _ in range(max_iter):
        width = hi - lo
        if width <= rel_tol * lo:
            break
        if hi > 4 * lo:
            mid = math.sqrt(lo * hi)  # orders of magnitude apart: halve the ratio, not the difference
        elif width < 3 * rel_tol * lo:
            mid = lo + width / 2
        else:
            m_lo, m_hi = math.log(max(1 - a_lo, _MISS_FLOOR)), math.log(max(1 - a_hi, _MISS_FLOOR))
            share = (log_target - m_lo) / (m_hi - m_lo) if m_hi > m_lo else 0.5
            mid = lo + width * min(max(share, _GUARD), 1 - _GUARD)
        a_mid = simulate(mid)
        if a_mid >= target:
            lo, a_lo = mid, a_mid
        else:
            hi, a_hi = mid, a_mid
    return lo
