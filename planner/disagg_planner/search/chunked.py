"""Chunked-prefill colocated instances in the search: their rate bound and the chunk token budgets to try.

Sarathi-Serve sizes the chunk so that a mixed step stays near the TPOT SLO; a larger chunk prefills
faster (fewer weight reads per prompt, shorter TTFT), a smaller one stalls decodes less. Which wins depends
on which SLO binds, so the search tries a TPOT-leaning budget (512 tokens, Sarathi-Serve's usual chunk) and
a TTFT-leaning one (2048, vLLM's default batched-token budget), both within the spec's prefill token
budget: two isolated simulations per shape, and budgets small enough to be this cheap are not worth
simulating (every step of a 128-token chunk is one more event per prompt).
"""

from __future__ import annotations

from ..latency import LatencyModel
from .capacity import LengthStats, decode_capacity, prefill_capacity
from .shapes import Shape

CHUNK_BUDGETS = (512, 2048)


def chunked_capacity(latency: LatencyModel, shape: Shape, stats: LengthStats, token_budget: int, tpot_slo_s: float,
                     link: float, mem_util: float) -> float:
    """Requests/s a chunked-prefill colocated instance cannot exceed: neither phase can beat its own bound
    (mixed steps share weight reads, so the colocated sum of both phases' time is not a bound here)."""
    prefill = prefill_capacity(latency, shape, stats, token_budget)
    decode = decode_capacity(latency, shape, stats, tpot_slo_s, link, mem_util)
    return min(prefill, decode)


def chunk_budgets(token_budget: int) -> tuple[int, ...]:
    """The chunk token budgets to try, within the prefill token budget."""
    return tuple(sorted({min(b, token_budget) for b in CHUNK_BUDGETS}))
