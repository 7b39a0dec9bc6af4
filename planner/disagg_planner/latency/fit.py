"""Least-squares fit of the step-time forms to a runtime profile's samples.

prefill(batch) = a + b·Σlen + c·Σlen²      decode(step) = base(batch) + c·Σcontext

A decode step's time at no context is not linear in the batch on a GPU: flat while the weights' bytes
dominate, then steeper as the GEMMs fill (an H200's Llama-3-8B profile: the line a + b·batch was 2% fast
at batch 4-16, 5-6% slow at 64 and 4-5% fast at 256, and near the knee a few percent of TPOT move
attainment by tens of points). So `base` is the profile's own per-batch time with the context term taken
out (one intercept per batch and a shared context term, fitted together), interpolated between the profiled batches (and extended past them along the last segment); the line
a + b·batch is kept for a profile that has only one batch size.

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

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class DecodeFit(LinearFit):
    """decode(step) = base(batch) + c·Σcontext; `bases` are (batch, seconds at no context) at the profiled
    batch sizes, non-decreasing in the batch. With `step_batches` (the engine's CUDA-graph sizes,
    `ShapeProfile.decode_step_batches`) a step's base is that of the size it is padded to."""

    bases: tuple[tuple[int, float], ...] = ()
    step_batches: tuple[int, ...] = ()

    def base(self, batch: float) -> float:
        """Seconds of a decode step of `batch` sequences, before its context term."""
        batch = padded_batch(self.step_batches, batch)
        pts = self.bases
        if len(pts) < 2:
            return self.a + self.b * batch
        xs = [x for x, _ in pts]
        i = bisect.bisect_right(xs, batch)
        if i == 0:  # below the smallest profiled batch: along the fitted slope
            return max(pts[0][1] - self.b * (xs[0] - batch), 0.0)
        if i == len(pts):  # past the largest: along the last segment (steps only get steeper)
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
        else:
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)

    def __call__(self, x1: float, x2: float) -> float:
        return self.base(x1) + self.c * x2


def fit_linear(x1: Sequence[float], x2: Sequence[float], seconds: Sequence[float], what: str) -> LinearFit:
    """Fit a + b·x1 + c·x2 to `seconds` minimising Σ((pred - t) / t)² with a, b, c >= 0."""
    return _fit_linear(x1, x2, seconds, what)[0]


def _fit_linear(x1: Sequence[float], x2: Sequence[float], seconds: Sequence[float],
                what: str) -> tuple[LinearFit, np.ndarray]:
    """`fit_linear`, and which samples it kept."""
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
                     int((~keep).sum())), keep


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


def padded_batch(step_batches: Sequence[int], batch: float) -> float:
    """The smallest of `step_batches` (increasing) that holds `batch`; `batch` itself past the largest."""
    i = bisect.bisect_left(step_batches, batch)
    return step_batches[i] if i < len(step_batches) else batch


def fit_decode(samples: Sequence[DecodeSample], what: str, step_batches: Sequence[int] = ()) -> DecodeFit:
    """The decode line (which picks the outliers and serves a one-batch profile), then each profiled batch's
    own base with a shared context term refitted, the bases made non-decreasing in the batch.

    A sample is keyed by the batch its step ran at (`padded_batch`): a step of 40 sequences on an engine
    with graphs at 32 and 48 measured the base of 48.
    """
    steps = tuple(step_batches)
    batch = np.asarray([padded_batch(steps, s.batch_size) for s in samples], dtype=float)
    context = np.asarray([s.sum_context for s in samples], dtype=float)
    t = np.asarray([s.seconds for s in samples], dtype=float)
    line, keep = _fit_linear(batch, context, t, what)
    sizes = sorted({int(b) for b in batch[keep]})
    # One intercept per batch size and a shared context term, on relative error like the line: the line's
    # own context term absorbs some of its misfit in the batch.
    design = np.column_stack([*(batch[keep] == b for b in sizes), context[keep]]).astype(float)
    sol, _, rank, _ = np.linalg.lstsq(design / t[keep][:, None], np.ones(int(keep.sum())), rcond=None)
    per_context = float(sol[-1])
    if rank < design.shape[1] or per_context < 0:
        # One context per batch (the context term cannot be told from the batch's own), or a context term
        # the samples contradict: the line's context term, and each batch's median of what is left.
        per_context = line.c
        sol = np.array([float(np.median((t - per_context * context)[keep & (batch == b)])) for b in sizes] + [0.0])
    bases = np.maximum.accumulate(np.maximum(sol[:-1], 0.0)).tolist()
    fit = DecodeFit(line.a, line.b, per_context, line.rms_relative_error, line.outliers,
                    tuple(zip(sizes, bases, strict=True)), steps)
    rel = [(fit(b, c) - s) / s for b, c, s in zip(batch[keep], context[keep], t[keep], strict=True)]
    return replace(fit, rms_relative_error=float(np.sqrt(np.mean(np.square(rel)))))
