"""Choosing among measured candidates: meeting the target first, statistical ties broken by fewer GPUs."""

from dataclasses import dataclass

import pytest
from disagg_planner.api import GoodputInterval
from disagg_planner.search.confidence import choose, interval_seeds, overlaps
from disagg_planner.search.estimator import prediction_interval
from disagg_planner.search.runner import TaskPool


@dataclass(frozen=True)
class _M:
    name: str
    gpus: int
    goodput: float
    low: float
    high: float


def _pick(items, rate=100.0, target_met=lambda m: m.goodput >= 100.0):
    asked = []

    def interval(m):
        asked.append(m.name)
        return GoodputInterval(low_rps=m.low, high_rps=m.high, coverage=0.9)

    best = choose(items, rate, gpus=lambda m: m.gpus, goodput=lambda m: m.goodput, meets=target_met,
                  interval=interval)
    return best, asked


def test_among_candidates_meeting_the_target_fewest_gpus_wins_without_intervals():
    best, asked = _pick([_M("big", 16, 180.0, 170, 190), _M("small", 10, 104.0, 95, 110), _M("miss", 8, 90, 85, 99)])
    assert best.name == "small" and asked == []


def test_overlapping_intervals_tie_and_fewer_gpus_wins():
    best, _ = _pick([_M("a", 16, 60.0, 55, 65), _M("b", 12, 57.0, 53, 61), _M("c", 8, 40.0, 36, 44)])
    assert best.name == "b"  # b's interval overlaps a's; c's does not


def test_separate_intervals_keep_the_higher_goodput():
    best, _ = _pick([_M("a", 16, 60.0, 58, 62), _M("b", 12, 50.0, 48, 52)])
    assert best.name == "a"


def test_nothing_with_goodput_is_no_choice():
    assert _pick([_M("zero", 4, 0.0, 0, 0)])[0] is None


def test_capped_overlap_and_the_prediction_interval():
    a = GoodputInterval(low_rps=110, high_rps=130, coverage=0.9)
    b = GoodputInterval(low_rps=99, high_rps=100.5, coverage=0.9)
    assert overlaps(a, b, rate=100.0) and not overlaps(a, b, rate=200.0)
    low, high = prediction_interval([10.0, 10.0, 10.0], point=10.0, bound=10.0, rel_tol=0.03)
    assert low < 10.0 and high == 10.0  # no goodput exceeds capacity; the bisection's tolerance below
    low, high = prediction_interval([9.0, 10.0, 11.0, 10.0, 10.0], point=10.0, bound=50.0, rel_tol=0.03)
    assert low < 9.0 and high > 11.0
    assert interval_seeds(7)[0] == 7 and len(set(interval_seeds(7))) == len(interval_seeds(7))


def test_a_closed_pool_refuses_work_instead_of_leaking_a_new_one():
    with TaskPool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        pool.map(abs, [-1, -2])
