"""Goodput bisection: finds the attainment threshold within tolerance, with its bracket rules."""

import pytest
from disagg_planner.search import goodput


def step(threshold: float, calls: list[float] | None = None):
    """Attainment 1 up to `threshold`, then falling linearly to 0 over one more unit of rate."""

    def attainment(rate: float) -> float:
        if calls is not None:
            calls.append(rate)
        return 1.0 if rate <= threshold else max(0.0, 1.0 - (rate - threshold))

    return attainment


@pytest.mark.parametrize("threshold", [0.5, 1.7, 3.2, 7.9])
def test_finds_the_crossing_within_tolerance(threshold):
    # attainment >= 0.9 up to threshold + 0.1
    found = goodput(step(threshold), 0.9, 1.0, 8.0, rel_tol=0.01)
    true = threshold + 0.1
    assert true * 0.99 <= found <= true + 1e-9


def test_zero_when_even_the_smallest_rate_fails():
    calls: list[float] = []
    assert goodput(step(-5.0, calls), 0.9, 1.0, 2.0, max_shrink=2) == 0.0
    assert min(calls) == pytest.approx(1.0 / 16)  # lo shrank twice by 4


def test_ceiling_is_returned_not_exceeded_without_expansion():
    assert goodput(step(100.0), 0.9, 1.0, 10.0, max_expand=0) == 10.0


def test_expands_past_a_low_guess():
    found = goodput(step(30.0), 0.9, 1.0, 2.0, rel_tol=0.01, max_expand=6)
    assert found == pytest.approx(30.1, rel=0.01)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attainment target"):
        goodput(step(1.0), 1.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="0 < lo < hi"):
        goodput(step(1.0), 0.9, 2.0, 1.0)
