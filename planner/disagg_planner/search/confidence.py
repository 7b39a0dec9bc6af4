"""How sure a plan is of its goodput: repeated seeds, and ties between candidates whose intervals overlap.

Seed policy: a search with seed s measures everything on seed s's request sample; the interval re-measures
the chosen configuration, by the same estimator (estimator.py), on the samples of seeds s+1 .. s+REPEATS.
A different draw from the same workload changes goodput by several percent (DistServe's own search scores
one configuration at 1.56 and 2.52 req/s per GPU on two draws of 300 requests), so a plan states the range
a fresh trace's goodput falls in, and the search does not prefer one candidate over another on a
difference smaller than that.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

from ..api.plan import GoodputInterval
from .allocate import Candidate
from .estimator import COVERAGE, SystemConfig, prediction_interval, seed_goodput
from .problem import SearchProblem
from .runner import TaskPool

T = TypeVar("T")
F = TypeVar("F", bound="FittedLike")


class FittedLike(Protocol):
    """What `contenders` reads of a fitted candidate (system.Fitted)."""

    @property
    def candidate(self) -> Candidate: ...

    def meets(self, target: float) -> bool: ...

# Fresh samples the interval is measured on, besides the plan's own.
REPEATS = 4


def interval_seeds(seed: int) -> list[int]:
    """The seeds an interval is measured on: the plan's own, then the next REPEATS."""
    return [seed + i for i in range(REPEATS + 1)]


def _goodput_on(cfg: SystemConfig, bound: float, near: float, problem: SearchProblem) -> float:
    return seed_goodput(problem, cfg, bound, near)


def goodput_interval(problems: Callable[[int], SearchProblem], seed: int, cfg: SystemConfig, bound: float,
                     point: float, pool: TaskPool) -> GoodputInterval:
    """The interval for `cfg`, whose goodput on `seed` is `point` (`problems(s)`: the problem on seed s)."""
    seeds = interval_seeds(seed)
    others = pool.map(partial(_goodput_on, cfg, bound, point), [problems(s) for s in seeds[1:]])
    samples = [point, *others]
    low, high = prediction_interval(samples, point, bound, problems(seed).rel_tol)
    return GoodputInterval(low_rps=low, high_rps=high, coverage=COVERAGE, seeds=seeds, samples_rps=samples)


def capped(low: float, high: float, rate: float) -> tuple[float, float]:
    return min(low, rate), min(high, rate)


def overlaps(a: GoodputInterval, b: GoodputInterval, rate: float) -> bool:
    """Do the intervals overlap once capped at the target rate (goodput past it buys nothing)?"""
    a_lo, a_hi = capped(a.low_rps, a.high_rps, rate)
    b_lo, b_hi = capped(b.low_rps, b.high_rps, rate)
    return a_lo <= b_hi and b_lo <= a_hi


def contenders(fitted: list[F], target: float, rate: float) -> list[F]:
    """The fitted candidates (best-ranked first) that `choose` can pick once their goodputs are known.

    When some meet the target, `choose` takes the fewest GPUs among them and compares goodput only there;
    a candidate meeting the target has goodput >= `rate` > 0 (the estimator's anchor), so none of them is
    dropped as useless. When none meets it, every goodput counts.
    """
    meeting = [f for f in fitted if f.meets(target)]
    if not meeting or rate <= 0:
        return fitted
    fewest = min(f.candidate.gpus for f in meeting)
    return [f for f in meeting if f.candidate.gpus == fewest]


def choose(items: list[T], rate: float, gpus: Callable[[T], int], goodput: Callable[[T], float],
           meets: Callable[[T], bool], interval: Callable[[T], GoodputInterval]) -> T | None:
    """The plan among measured candidates (`items`, best-ranked first); None when none has goodput.

    Meeting the target comes first. Among the candidates that do, goodput capped at the target rate is the
    rate itself for all of them, so their capped intervals all overlap: a tie, the fewest GPUs wins. When
    none meets it, the most goodput is compared with its interval: every candidate with fewer GPUs whose
    interval overlaps the best one's ties with it, and the fewest GPUs wins again. `interval` is called only
    there (it costs REPEATS measurements).
    """
    useful = [m for m in items if goodput(m) > 0]
    if not useful:
        return None
    meeting = [m for m in useful if meets(m)]
    if meeting:
        tied = meeting
    else:
        best = max(useful, key=lambda m: (min(goodput(m), rate), -gpus(m)))
        tied = [best] + [m for m in useful if gpus(m) < gpus(best) and overlaps(interval(m), interval(best), rate)]
    return min(tied, key=lambda m: (gpus(m), -goodput(m)))  # min keeps the first (best-ranked) among equals
