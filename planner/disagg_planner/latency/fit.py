"""Least-squares fit of the step-time forms to a runtime profile's samples.

prefill(batch) = a + b·Σlen + c·Σlen²      decode(step) = a + b·batch + c·Σcontext

Coefficients are constrained non-negative (a negative coefficient would predict negative or
shrinking times outside the sampled range) and fitted on relative error, as DistServe does, so that
short steps weigh as much as long ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..api.profile import DecodeSample, PrefillSample

MIN_SAMPLES = 3


class ProfileError(ValueError):
    """A latency profile that cannot be used (too few samples, wrong model or GPU)."""


@dataclass(frozen=True)
class LinearFit:
    """time = a + b·x1 + c·x2 (seconds), with the fit's RMS relative error."""

    a: float
    b: float
    c: float
    rms_relative_error: float

    def __call__(self, x1: float, x2: float) -> float:
        return self.a + self.b * x1 + self.c * x2


def nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns, exactly: the best of all active sets.

    With 3 unknowns there are 7 non-empty supports; solving each by ordinary least squares and keeping
    the best non-negative one is exact and avoids a SciPy dependency in the planner.
    """
    n = matrix.shape[1]
    best, best_err = np.zeros(n), float(np.sum(target**2))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(matrix[:, cols], target, rcond=None)
            if np.any(sol < 0):
                continue
            full = np.zeros(n)
            full[cols] = sol
            err = float(np.sum((matrix @ full - target) ** 2))
            if err < best_err - 1e-18:
                best, best_err = full, err
    return best


def fit_linear(x1: Sequence[float], x2: Sequence[float], seconds: Sequence[float], what: str) -> LinearFit:
    """Fit a + b·x1 + c·x2 to `seconds` minimising Σ((pred - t) / t)² with a, b, c >= 0."""
    if len(seconds) < MIN_SAMPLES:
        raise ProfileError(f"{what}: need at least {MIN_SAMPLES} samples to fit 3 coefficients, got {len(seconds)}")
    t = np.asarray(seconds, dtype=float)
    design = np.column_stack([np.ones_like(t), np.asarray(x1, dtype=float), np.asarray(x2, dtype=float)])
    # Scale columns so the solver sees comparable magnitudes (Σlen² reaches 1e7 where the intercept is 1).
    scale = np.maximum(np.abs(design).max(axis=0), 1e-30)
    coef = nnls(design / scale / t[:, None], np.ones_like(t)) / scale
    rel = (design @ coef - t) / t
    return LinearFit(float(coef[0]), float(coef[1]), float(coef[2]), float(np.sqrt(np.mean(rel**2))))


def fit_prefill(samples: Sequence[PrefillSample], what: str) -> LinearFit:
    return fit_linear(
        [s.sum_tokens for s in samples], [s.sum_sq_tokens for s in samples], [s.seconds for s in samples], what
    )


def fit_decode(samples: Sequence[DecodeSample], what: str) -> LinearFit:
    return fit_linear(
        [s.batch_size for s in samples], [s.sum_context for s in samples], [s.seconds for s in samples], what
    )
