"""Analytic roofline step times, used when no runtime profile exists.

Prefill is compute-bound: every prompt token costs the dense matmul FLOPs, attention adds a term
quadratic in the prompt length, and the weights must still stream from HBM once per step. Decode is
bandwidth-bound: each step reads all weights plus the KV cache of every running sequence, and only at
large batches do the matmul FLOPs overtake the weight read.

The efficiencies below are calibrated against DistServe's published A100-80GB profile of OPT-13B
(LLMServe/DistServe simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json, times in ms):
prefill(tp=1) = 16.5 + 0.0926·Σlen + 6.5e-6·Σlen², decode(tp=1, batch < 95) = 19.9 + 0.0385·batch +
0.00063·Σcontext, decode(batch >= 95) = 7.2 + 0.158·batch + 0.00058·Σcontext. With them this model gives
prefill = 16.6 + 0.0928·Σlen + 6.5e-6·Σlen² and a decode step of 19.8 ms at batch 1, 46 ms at batch 256
(paper: ~20 ms and ~48 ms). The same constants are used for every GPU: the planner compares shapes on
one GPU type, where a shared efficiency cancels.
"""

from __future__ import annotations

from ..api.cluster import GPUSpec
from .shape import StageShape, allreduce_time

# Share of peak HBM bandwidth reached when streaming weights (large contiguous reads).
WEIGHT_READ_EFFICIENCY = 0.8
# Share of peak bandwidth for KV-cache reads: paged, per-sequence gathers reach less (0.65 fits the
# measured 0.00063 ms per context token of OPT-13B, 0.82 MB of KV per token, at 2039 GB/s).
KV_READ_EFFICIENCY = 0.65
# Prefill matmuls are large GEMMs; the measured OPT-13B slope (0.0926 ms/token for 25.2 GFLOP/token)
# is 87% of the A100's 312 TFLOP/s.
PREFILL_MFU = 0.87
# Attention's quadratic part runs far below peak at these lengths (softmax, masking, short tiles):
# the measured quadratic coefficient corresponds to ~20% of peak.
ATTENTION_MFU = 0.2
# Decode GEMMs are skinny (batch rows); the large-batch slope (0.158 ms/sequence) is ~50% of peak.
DECODE_MFU = 0.5
# Per-layer fixed costs (kernel launches, layer norms, scheduling). A decode step pays more per layer
# (sampling, paged-attention set-up, no fusion across steps): 0.1 ms/layer puts OPT-13B's batch-1 step
# at 19.8 ms; prefill's measured intercept leaves ~0.02 ms/layer after the weight read.
PREFILL_LAYER_OVERHEAD_S = 20e-6
DECODE_LAYER_OVERHEAD_S = 100e-6


def weight_read_time(stage: StageShape, gpu: GPUSpec) -> float:
    return stage.weight_bytes / (gpu.hbm_gbps * 1e9 * WEIGHT_READ_EFFICIENCY)


def prefill_stage_time(
    stage: StageShape, gpu: GPUSpec, link_gbps: float, batch: int, sum_tokens: int, sum_sq_tokens: int
) -> float:
    """One stage's time to prefill a batch: overhead + weight read + dense and attention FLOPs + TP comm."""
    peak = gpu.peak_tflops * 1e12
    dense = (sum_tokens * stage.dense_flops_per_token + batch * stage.head_flops_per_seq) / (peak * PREFILL_MFU)
    attention = sum_sq_tokens * stage.attn_flops_per_sq_token / (peak * ATTENTION_MFU)
    return (
        stage.layers * PREFILL_LAYER_OVERHEAD_S
        + weight_read_time(stage, gpu)
        + dense
        + attention
        + allreduce_time(stage, sum_tokens, link_gbps)
    )


def decode_stage_coefficients(stage: StageShape, gpu: GPUSpec, link_gbps: float, batch: int) -> tuple[float, float]:
    """(base, per-context-token) seconds of one stage's decode step for `batch` sequences.

    base = overhead + max(weight read, batch matmul FLOPs) + TP comm; the KV read is linear in Σcontext.
    """
    peak = gpu.peak_tflops * 1e12
    compute = batch * (stage.dense_flops_per_token + stage.head_flops_per_seq) / (peak * DECODE_MFU)
    base = (
        stage.layers * DECODE_LAYER_OVERHEAD_S
        + max(weight_read_time(stage, gpu), compute)
        + allreduce_time(stage, batch, link_gbps)
    )
    per_context = stage.kv_bytes_per_token / (gpu.hbm_gbps * 1e9 * KV_READ_EFFICIENCY)
    return base, per_context
