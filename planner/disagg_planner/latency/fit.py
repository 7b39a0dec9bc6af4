"""Least-squares fit of the step-time forms to a runtime profile's samples.

prefill(batch) = a + b·Σlen + c·Σlen²      decode(step) = a + b·batch + c·Σcontext

Coefficients are constrained non-negative (a negative coefficient would predict negative or
shrinking times outside the sampled range) and fitted on relative error, as DistServe does, so that
short steps weigh as much as long ones.

A sample the form cannot explain (a step caught by a clock ramp or another process, a kernel that is
slow at one odd size) would bend the fit for every step: with one such prefill sample in a 16-sample
H200 profile the fit was 9% slow at the workload's prompt length, enough to move the simulated
knee by a few req/s.
So samples are tried as outliers one at a time (at most a fifth of them): one is left out when the fit
made without it misses it by more than `OUTLIER_RESIDUAL` and by more than `OUTLIER_SPREAD` standard
errors of that fit's prediction there (an externally studentised residual). The fit says how many it
left out (`outliers`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..api.profile import DecodeSample, PrefillSample

MIN_SAMPLES = 3
OUTLIER_RESIDUAL = 0.10  # a residual below this is never an outlier, whatever the spread
OUTLIER_SPREAD = 4.0  # ... nor one within this many standard errors of the prediction there
OUTLIER_SHARE = 0.2  # at most this share of the samples is left out
OUTLIER_CANDIDATES = 3  # samples tried per round, those the current fit misses most


class ProfileError(ValueError):
    """A latency profile that cannot be used (too few samples, wrong model or GPU)."""


@dataclass(frozen=True)
class LinearFit:
    """time = a + b·x1 + c·x2 (seconds), with the fit's RMS relative error over the samples it kept and
    how many it left out as outliers."""

    a: float
    b: float
    c: float
    rms_relative_error: float
    outliers: int = 0

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
    keep = np.ones(len(t), dtype=bool)
    coef, rel = _solve(design, t)
    for _ in range(min(int(OUTLIER_SHARE * len(t)), len(t) - 2 * MIN_SAMPLES)):
        found = _worst_outlier(design, t, keep, rel)
        if found is None:
            break
        j, coef, rel = found
        keep[j] = False
    return LinearFit(float(coef[0]), float(coef[1]), float(coef[2]), float(np.sqrt(np.mean(rel**2))),
                     int((~keep).sum()))


def _worst_outlier(design: np.ndarray, t: np.ndarray, keep: np.ndarray,
                   rel: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The kept sample that the fit made without it misses furthest beyond what that fit's own scatter
    allows there, with that fit (coefficients, residuals of the rest); None if no sample is that far off.

    Judged without the sample, because the fit made with it has bent towards it; against the scatter
    of a prediction at that point (its leverage), because a sample at the edge of the sampled range is
    an extrapolation for the fit without it. Candidates: the few the current fit misses most.
    """
    kept = np.flatnonzero(keep)
    rows = design / t[:, None]  # relative-error rows: the fit's target is 1 for every sample
    best: tuple[float, int, np.ndarray, np.ndarray] | None = None
    for j in kept[np.argsort(-np.abs(rel))[:OUTLIER_CANDIDATES]]:
        keep[j] = False
        coef, rest = _solve(design[keep], t[keep])
        others = rows[keep]
        keep[j] = True
        dof = max(len(rest) - design.shape[1], 1)
        scatter = float(np.sqrt(np.sum(rest**2) / dof))
        leverage = float(rows[j] @ np.linalg.pinv(others.T @ others) @ rows[j])
        miss = abs(float(rows[j] @ coef) - 1.0)
        excess = miss - max(OUTLIER_RESIDUAL, OUTLIER_SPREAD * scatter * np.sqrt(1.0 + leverage))
        if excess > 0 and (best is None or excess > best[0]):
            best = (excess, int(j), coef, rest)
    return None if best is None else best[1:]


def _solve(design: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative coefficients minimising the relative error; (coefficients, relative residuals)."""
    # Scale columns so the solver sees comparable magnitudes (Σlen² reaches 1e7 where the intercept is 1).
    scale = np.maximum(np.abs(design).max(axis=0), 1e-30)
    coef = nnls(design / scale / t[:, None], np.ones_like(t)) / scale
    return coef, (design @ coef - t) / t


def fit_prefill(samples: Sequence[PrefillSample], what: str) -> LinearFit:
    return fit_linear(
        [s.sum_tokens for s in samples], [s.sum_sq_tokens for s in samples], [s.seconds for s in samples], what
    )


def fit_decode(samples: Sequence[DecodeSample], what: str) -> LinearFit:
    return fit_linear(
        [s.batch_size for s in samples], [s.sum_context for s in samples], [s.seconds for s in samples], what
    )
