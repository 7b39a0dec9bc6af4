"""Closed-form bounds that steer and prune the search: unloaded latencies and steady-state capacities.

Capacities are rates (req/s) one instance cannot sustain beyond, whatever the queueing: prefill batches
cannot exceed the token budget, a decode batch cannot exceed KV memory nor run rounds slower than the TPOT
SLO. They bracket the goodput bisection and let the search skip shapes that cannot beat one already found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..latency import LatencyModel
from ..latency.memory import mean_kv_tokens, usable_kv_tokens
from ..simulator.rounds import RoundCost
from ..simulator.types import KVPolicy
from .shapes import Shape

# The engine's defaults, which the simulated configurations also use (simulator.KVPolicy).
KV_BLOCK_SIZE = KVPolicy().block_size
KV_WATERMARK = KVPolicy().watermark


@dataclass(frozen=True)
class LengthStats:
    """Moments of a request sample that the bounds need."""

    mean_input: float
    mean_sq_input: float
    mean_output: float
    inputs: np.ndarray  # per request, for quantile-exact unloaded latencies
    outputs: np.ndarray

    @classmethod
    def of(cls, inputs: np.ndarray, outputs: np.ndarray) -> LengthStats:
        return cls(float(inputs.mean()), float((inputs**2).mean()), float(outputs.mean()), inputs, outputs)


def unloaded_ttft(latency: LatencyModel, shape: Shape, prompt: int, stage_link_gbps: float) -> float:
    """TTFT of one prompt alone on an idle prefill instance (with the served path's hops)."""
    stage = latency.prefill_time(shape.tp, shape.pp, [prompt])
    act = prompt * latency.stage(shape.tp, shape.pp).hidden_bytes_per_token
    return latency.pipeline_latency(stage, shape.pp, int(act), stage_link_gbps) + latency.request_latency_s


def unloaded_tpot(latency: LatencyModel, shape: Shape, context: float, stage_link_gbps: float) -> float:
    """Round time of a decode batch of one sequence holding `context` tokens (its TPOT when alone)."""
    cost = RoundCost(latency, shape.tp, shape.pp, stage_link_gbps)
    return cost.base(1) + cost.slope * context


def unloaded_ttft_share(latency: LatencyModel, shape: Shape, stats: LengthStats, slo_s: float, link: float) -> float:
    """Share of the sample's prompts whose unloaded TTFT meets the SLO (an upper bound on TTFT attainment)."""
    ok = sum(1 for n in stats.inputs if unloaded_ttft(latency, shape, int(n), link) <= slo_s)
    return ok / len(stats.inputs)


def unloaded_tpot_share(latency: LatencyModel, shape: Shape, stats: LengthStats, slo_s: float, link: float) -> float:
    """Share of the sample's requests whose TPOT alone (mid-output context) meets the SLO."""
    cost = RoundCost(latency, shape.tp, shape.pp, link)
    contexts = stats.inputs + stats.outputs / 2
    ok = np.count_nonzero(cost.base(1) + cost.slope * contexts <= slo_s)
    return float(ok) / len(contexts)


def prefill_capacity(latency: LatencyModel, shape: Shape, stats: LengthStats, token_budget: int) -> float:
    """Requests/s of a saturated prefill instance: batches fill the token budget, stages overlap."""
    per_batch = max(1, math.floor(token_budget / stats.mean_input))
    stage = latency.prefill_stage_time(
        shape.tp, shape.pp, per_batch, round(per_batch * stats.mean_input), round(per_batch * stats.mean_sq_input)
    )
    return per_batch / stage


MAX_DECODE_BATCH = 1 << 14  # far above what a decode engine runs at once (the runtime's --max-batch is 256)


def decode_capacity(
    latency: LatencyModel, shape: Shape, stats: LengthStats, tpot_slo_s: float, link: float, mem_util: float
) -> float:
    """Requests/s of a decode instance at its largest batch whose rounds still meet the TPOT SLO.

    The batch is capped by KV memory as the engine manages it: blocks on demand, so in steady state a
    request holds its prompt plus half its output on average (`latency.memory.mean_kv_tokens`) within the
    cache less the admission watermark. Each round gives every running request one token, so the rate is
    batch / (round time x mean output).
    """
    cost = RoundCost(latency, shape.tp, shape.pp, link)
    footprint = mean_kv_tokens(stats.mean_input, stats.mean_output, KV_BLOCK_SIZE)
    context = stats.mean_input + stats.mean_output / 2
    usable = usable_kv_tokens(latency.kv_capacity_tokens(shape.tp, shape.pp, mem_util), KV_BLOCK_SIZE, KV_WATERMARK)
    # Capped: a degenerate shape's memory holds billions of requests, and round times are cached per batch.
    by_memory = min(int(usable // footprint), MAX_DECODE_BATCH)

    def round_time(batch: int) -> float:
        return cost.base(batch) + cost.slope * batch * context

    if by_memory < 1 or round_time(1) > tpot_slo_s:
        return 0.0
    lo, hi = 1, by_memory  # largest batch whose round meets the SLO; round time grows with the batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if round_time(mid) <= tpot_slo_s:
            lo = mid
        else:
            hi = mid - 1
    return lo / (round_time(lo) * max(stats.mean_output - 1, 1.0))


def kv_link_capacity(latency: LatencyModel, stats: LengthStats, link_gbps: float) -> float:
    """Requests/s whose KV cache one decode instance's link can take in (transfers run one after another)."""
    return link_gbps * 1e9 / (stats.mean_input * latency.model.kv_bytes_per_token)


def colocated_capacity(
    latency: LatencyModel, shape: Shape, stats: LengthStats, token_budget: int, tpot_slo_s: float, link: float,
    mem_util: float,
) -> float:
    """Requests/s of a colocated instance: its GPUs spend 1/prefill_capacity + 1/decode_capacity per request."""
    prefill = prefill_capacity(latency, shape, stats, token_budget)
    decode = decode_capacity(latency, shape, stats, tpot_slo_s, link, mem_util)
    if prefill <= 0 or decode <= 0:
        return 0.0
    return 1.0 / (1.0 / prefill + 1.0 / decode)
