"""Per-GPU memory: weights, activation workspace, the KV-cache capacity that is left, and how many
requests it holds when KV blocks are taken on demand (the runtime engine's policy)."""

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


def usable_kv_tokens(capacity_tokens: int, block_size: int, watermark: float) -> int:
    """KV tokens running sequences can fill: whole blocks, less the watermark admission keeps free."""
    blocks = capacity_tokens // block_size
    reserve = math.ceil(watermark * blocks) if watermark > 0 else 0
    return max(0, blocks - reserve) * block_size


def mean_kv_tokens(mean_input: float, mean_output: float, block_size: int) -> float:
    """KV tokens one request holds on average over its decode with blocks taken on demand.

    Its KV grows linearly from the prompt to prompt + output, so it holds the prompt plus half the output
    on average, and its last block is on average half empty. (A whole-life reservation would hold
    prompt + max_tokens throughout.)
    """
    return mean_input + mean_output / 2 + block_size / 2
