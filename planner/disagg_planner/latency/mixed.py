"""Mixed steps (chunked prefill, Sarathi-Serve / vLLM): one token for each running sequence plus prompt chunks.

A mixed step is one forward over `decode_batch + chunk_tokens` tokens: the dense layers see them all as
one packed batch (the weights stream from HBM once for both), the chunks attend causally over their own
prompt's earlier chunks (the `chunk_attention` term, in the units of a prefill's Σlen²), and each decode
token reads its sequence's KV (Σcontext).

With measured mixed steps in the profile a shape gets its own fit,
    time = a + b·(decode_batch + chunk_tokens) + c·chunk_attention + d·decode_context;
otherwise the step is derived from the prefill and decode fits: a prefill over all the step's tokens plus
the decode KV read, and never less than the decode step alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..api.profile import MixedSample
from .fit import MIN_SAMPLES, ProfileError, nnls

if TYPE_CHECKING:
    from .model import LatencyModel

MIXED_MIN_SAMPLES = MIN_SAMPLES + 1  # four coefficients


def chunk_attention(offset: int, tokens: int) -> int:
    """Causal-attention work of `tokens` prompt tokens after `offset` cached ones: (offset + tokens)² - offset²."""
    return (offset + tokens) ** 2 - offset**2


@dataclass(frozen=True)
class MixedFit:
    """time = a + b·tokens + c·chunk_attention + d·decode_context (seconds), whole instance."""

    a: float
    b: float
    c: float
    d: float
    rms_relative_error: float

    def __call__(self, tokens: float, attention: float, context: float) -> float:
        return self.a + self.b * tokens + self.c * attention + self.d * context


def fit_mixed(samples: Sequence[MixedSample], what: str) -> MixedFit:
    """Non-negative least squares on relative error, as the prefill and decode fits."""
    if len(samples) < MIXED_MIN_SAMPLES:
        raise ProfileError(f"{what}: need at least {MIXED_MIN_SAMPLES} mixed samples to fit 4 coefficients, "
                           f"got {len(samples)}")
    t = np.array([s.seconds for s in samples], dtype=float)
    design = np.array([[1.0, s.decode_batch + s.chunk_tokens, s.chunk_attention, s.decode_context]
                       for s in samples], dtype=float)
    scale = np.maximum(np.abs(design).max(axis=0), 1e-30)
    coef = nnls(design / scale / t[:, None], np.ones_like(t)) / scale
    rel = (design @ coef - t) / t
    return MixedFit(*(float(c) for c in coef), float(np.sqrt(np.mean(rel**2))))


def fit_mixed_shapes(shapes: Sequence) -> dict[tuple[int, int], MixedFit]:
    """Mixed fits of the profile's shapes that carry mixed samples (ShapeProfile list)."""
    return {(s.tp, s.pp): fit_mixed(s.mixed, f"profile shape tp={s.tp} pp={s.pp} mixed")
            for s in shapes if s.mixed}


def mixed_stage_time(latency: LatencyModel, tp: int, pp: int, decode_batch: int, decode_context: int,
                     chunks: int, chunk_tokens: int, chunk_attn: int) -> float:
    """ONE pipeline stage's time for a mixed step (see the module doc)."""
    if chunk_tokens <= 0:
        if decode_batch <= 0:
            raise ValueError("a mixed step needs decode tokens or prompt chunks")
        return latency.decode_time(tp, pp, decode_batch, decode_context)
    stage = latency.stage(tp, pp)
    fit = latency.mixed_fits.get((tp, pp))
    if fit is not None:
        whole = fit(decode_batch + chunk_tokens, chunk_attn, decode_context)
        return whole * stage.layers / latency.model.num_layers
    tokens = decode_batch + chunk_tokens
    prefill = latency.prefill_stage_time(tp, pp, chunks + decode_batch, tokens, chunk_attn)
    if decode_batch <= 0:
        return prefill
    base, per_context = latency.decode_coefficients(tp, pp, decode_batch)
    kv_read = per_context * decode_context
    return max(prefill + kv_read, base + kv_read)
