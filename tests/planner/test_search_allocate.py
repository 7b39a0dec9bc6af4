"""Replica allocation: fewest replicas that reach the rate; the most goodput when the budget binds."""

import math

from disagg_planner.search.allocate import (
    _pair,
    colocated_candidates,
    disaggregated_candidates,
    ranked,
    unit_candidates,
)
from disagg_planner.search.shapes import Segments, Shape
from hypothesis import given, settings
from hypothesis import strategies as st


def test_replicas_reach_the_target_rate_with_the_fewest_gpus():
    cands = disaggregated_candidates({Shape(1, 1): 3.0, Shape(2, 1): 7.0}, {Shape(1, 1): 7.5}, rate=10.0, budget=32)
    best = ranked(cands, 10.0)[0]
    # both use 6 GPUs (tp1: 4 + 2, tp2: 2x2 + 2); tp2 serves min(14, 15) > min(12, 15) req/s
    assert (best.prefill, best.n_prefill, best.n_decode, best.gpus) == (Shape(2, 1), 2, 2, 6)
    assert best.estimate == 14.0


def test_binding_budget_buys_the_most_goodput():
    cands = disaggregated_candidates({Shape(1, 1): 2.0}, {Shape(1, 1): 6.0}, rate=100.0, budget=8)
    best = ranked(cands, 100.0)[0]
    assert (best.n_prefill, best.n_decode) == (6, 2)  # min(12, 12): prefill is three times slower
    assert best.estimate == 12.0 and best.gpus == 8


def test_candidates_that_cannot_fit_or_serve_are_dropped():
    assert disaggregated_candidates({Shape(4, 1): 9.0}, {Shape(4, 1): 9.0}, rate=1.0, budget=6) == []
    assert disaggregated_candidates({Shape(1, 1): 0.0}, {Shape(1, 1): 9.0}, rate=1.0, budget=6) == []


def test_colocated_and_unit_replication():
    (colo,) = colocated_candidates({Shape(2, 1): 4.0}, rate=10.0, budget=16)
    assert (colo.n_prefill, colo.gpus, colo.estimate) == (3, 6, 12.0)
    (unit,) = unit_candidates({Segments(2, 2, 2): (5.0, 3.0)}, rate=100.0, budget=20)
    assert (unit.n_prefill, unit.n_decode, unit.gpus, unit.estimate) == (2, 2, 16, 6.0)


def test_ranking_prefers_reaching_the_rate_then_fewer_gpus():
    cands = colocated_candidates({Shape(1, 1): 1.0, Shape(4, 1): 6.0, Shape(8, 1): 20.0}, rate=10.0, budget=8)
    # tp8: 1 instance (8 GPUs, 20 req/s); tp4: 2 instances (8 GPUs, 12 req/s); tp1: the budget's 8 (8 req/s)
    order = [c.prefill for c in ranked(cands, 10.0)]
    assert order == [Shape(8, 1), Shape(4, 1), Shape(1, 1)]


def _pair_by_enumeration(gp, vp, gd, vd, rate, budget):
    """Every prefill count under the budget, each with its matching decode count (the definition)."""
    n, m = math.ceil(rate / vp), math.ceil(rate / vd)
    if n * gp + m * gd <= budget:
        return n, m, min(n * vp, m * vd)
    options = []
    for n in range(1, (budget - gd) // gp + 1):
        m = min((budget - n * gp) // gd, max(1, math.ceil(n * vp / vd - 1e-9)))
        options.append((min(n * vp, m * vd), -(n * gp + m * gd), n, m))
    est, _, n, m = max(options)
    return n, m, est


@settings(max_examples=300, deadline=None, derandomize=True)
@given(gp=st.sampled_from([1, 2, 3, 4, 8, 16]), gd=st.sampled_from([1, 2, 4, 5, 8]),
       vp=st.floats(0.1, 50), vd=st.floats(0.1, 50), rate=st.floats(1, 5000), budget=st.integers(2, 1024))
def test_budget_bound_split_matches_enumerating_every_count(gp, gd, vp, vd, rate, budget):
    if gp + gd > budget:
        assert _pair(gp, vp, gd, vd, rate, budget) is None
        return
    assert _pair(gp, vp, gd, vd, rate, budget) == _pair_by_enumeration(gp, vp, gd, vd, rate, budget)
