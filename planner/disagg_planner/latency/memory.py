"""Per-GPU memory: weights, activation workspace, and the KV-cache capacity that is left."""

from __future__ import annotations

import math

from ..api.cluster import GPUSpec
from ..api.model import ModelSpec
from .shape import ShapeError, stage_shape

# Activation workspace is sized for the tokens of one prefill batch at the default token budget: the
# widest live activations are the MLP's up-projection (ffn/tp per token, twice for gated MLPs' two
# halves) next to a few hidden-size buffers (residual, attention output, norm).
WORKSPACE_TOKENS = 4096
# cuBLAS/NCCL workspaces, the sampler and allocator slack that no formula above covers.
FIXED_RESERVE_BYTES = 512 * 2**20


def workspace_bytes(model: ModelSpec, tp: int) -> float:
    per_token = (4 * model.hidden_size + 2 * model.ffn_size / tp) * model.dtype_bytes
    return WORKSPACE_TOKENS * per_token + FIXED_RESERVE_BYTES


def kv_capacity_tokens(model: ModelSpec, gpu: GPUSpec, tp: int, pp: int, mem_util: float) -> int:
    """KV tokens one (tp, pp) instance holds: every stage must hold every token's KV for its layers.

    The largest stage bounds the instance (it holds the most layers and an embedding copy). Returns 0
    when the weights and workspace alone exceed `mem_util` of the GPU, or when the shape is invalid.
    """
    if not 0 < mem_util <= 1:
        raise ValueError(f"mem_util must be in (0, 1], got {mem_util}")
    try:
        stage = stage_shape(model, tp, pp)
    except ShapeError:
        return 0
    free = gpu.memory_gib * 2**30 * mem_util - stage.weight_bytes - workspace_bytes(model, tp)
    if free <= 0:
        return 0
    return int(math.floor(free / stage.kv_bytes_per_token))
