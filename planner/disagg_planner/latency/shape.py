"""How a model splits over a (tp, pp) instance: per-GPU weights, FLOPs, KV bytes and all-reduce cost.

Everything here is exact bookkeeping from the model's shape; the efficiencies that turn it into time
live in `analytic.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..api.model import ModelSpec

# An all-reduce costs a fixed launch/synchronisation latency plus ring traffic. NCCL's small-message
# all-reduce over NVLink takes ~10-20 us; we use 15 us, which puts OPT-13B's tp=2 decode step on an
# A100 at ~13 ms, as DistServe's published A100 profile measures (13.3 ms at small batch).
ALLREDUCE_LATENCY_S = 15e-6
# Ring all-reduces reach well under the link's nominal bandwidth for the activation sizes of inference
# (tens of MB at most), and are not overlapped with compute in the engines we model. 0.4 makes the
# per-token prefill cost of OPT-13B at tp=4 (A100, 300 GB/s) match DistServe's fit within ~5%.
ALLREDUCE_EFFICIENCY = 0.4


class ShapeError(ValueError):
    """An instance shape the model cannot be split into."""


@dataclass(frozen=True)
class StageShape:
    """The slowest pipeline stage of a (tp, pp) instance, per GPU."""

    tp: int
    pp: int
    layers: int  # layers in the largest stage
    weight_bytes: float  # weights held by one GPU of that stage
    dense_flops_per_token: float  # matmul FLOPs per token on one GPU (LM head excluded)
    head_flops_per_seq: float  # LM head FLOPs for one sequence's last token, on one GPU
    attn_flops_per_sq_token: float  # causal attention FLOPs per (prompt length)^2, on one GPU
    kv_bytes_per_token: float  # K and V of one token for this stage's layers, on one GPU
    hidden_bytes_per_token: float  # one token's activation (what crosses a stage boundary)


def layer_params(model: ModelSpec) -> int:
    """Parameters of one transformer layer (mirrors ModelSpec.num_params)."""
    return (model.num_params - non_layer_params(model)) // model.num_layers


def non_layer_params(model: ModelSpec) -> int:
    """Embeddings (+ untied LM head for llama, + learned positions for OPT)."""
    h, v = model.hidden_size, model.vocab_size
    if model.architecture == "llama":
        return 2 * v * h
    return v * h + model.max_context * h


def check_shape(model: ModelSpec, tp: int, pp: int) -> None:
    """Raise ShapeError when heads, KV heads, the MLP or layers cannot be divided as asked.

    The runtime's rules (disagg_runtime.parallel.tp.check_shardable): tp divides the attention heads, the KV
    heads (split whole over the tp ranks; the engine does not replicate them, though the KV resharding plan
    could move replicated heads) and the MLP width; pp stages take contiguous layer ranges, so any pp up to
    the layer count works (uneven splits allowed).
    """
    if tp < 1 or pp < 1:
        raise ShapeError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
    if model.num_heads % tp:
        raise ShapeError(f"tp={tp} does not divide {model.name}'s {model.num_heads} attention heads")
    if model.num_kv_heads % tp:
        raise ShapeError(f"tp={tp} does not divide {model.name}'s {model.num_kv_heads} KV heads")
    if model.ffn_size % tp:
        raise ShapeError(f"tp={tp} does not divide {model.name}'s MLP width {model.ffn_size}")
    if pp > model.num_layers:
        raise ShapeError(f"pp={pp} exceeds {model.name}'s {model.num_layers} layers")


def tensor_parallel_degrees(model: ModelSpec, limit: int) -> list[int]:
    """Every tp up to `limit` the model splits over (not only powers of two: OPT-66B's 72 heads allow 3)."""
    out = []
    for tp in range(1, limit + 1):
        try:
            check_shape(model, tp, 1)
        except ShapeError:
            continue
        out.append(tp)
    return out


def stage_shape(model: ModelSpec, tp: int, pp: int) -> StageShape:
    """Per-GPU quantities of the largest stage (ceil(layers / pp) layers; it also holds embeddings)."""
    check_shape(model, tp, pp)
    layers = math.ceil(model.num_layers / pp)
    per_layer = layer_params(model)
    # With pp > 1 the first stage holds the embedding and the last the LM head; for OPT the head is the
    # tied embedding, so each end stage holds a full copy. Llama's two matrices split one per end.
    embed = non_layer_params(model)
    if pp > 1 and model.architecture == "llama":
        embed //= 2
    b = model.dtype_bytes
    kv_heads_per_gpu = math.ceil(model.num_kv_heads / tp)  # fewer kv heads than GPUs: replicated
    h, v = model.hidden_size, model.vocab_size
    return StageShape(
        tp=tp, pp=pp, layers=layers,
        weight_bytes=(layers * per_layer + embed) * b / tp,
        dense_flops_per_token=2.0 * layers * per_layer / tp,
        head_flops_per_seq=2.0 * v * h / tp,
        attn_flops_per_sq_token=2.0 * layers * h / tp,  # 4·h·ctx per token, summed causally: 2·h·len²
        kv_bytes_per_token=2.0 * layers * kv_heads_per_gpu * model.head_dim * b,
        hidden_bytes_per_token=float(h * b),
    )


def allreduce_time(stage: StageShape, tokens: int, link_gbps: float) -> float:
    """Tensor-parallel communication of one stage's step over `tokens` tokens, seconds.

    Two all-reduces per layer (after attention and after the MLP) of tokens·hidden activations; a ring
    moves 2(tp-1)/tp of the buffer through each GPU's link.
    """
    if stage.tp == 1:
        return 0.0
    ring = 2.0 * (stage.tp - 1) / stage.tp * tokens * stage.hidden_bytes_per_token
    per_allreduce = ALLREDUCE_LATENCY_S + ring / (link_gbps * 1e9 * ALLREDUCE_EFFICIENCY)
    return 2 * stage.layers * per_allreduce
