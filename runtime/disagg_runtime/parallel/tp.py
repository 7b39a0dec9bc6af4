"""Tensor parallelism through DeepSpeed AutoTP with an explicit injection policy on our own layers.

Why this route: `deepspeed.init_inference(..., injection_policy=...)` works on CPU with gloo (kernel
injection does not: its fused kernels are CUDA-only), and it needs nothing from our modules but
standard `nn.Linear`s with HF names. AutoTP splits q/k/v/gate/up (and OPT's fc1) by output
columns, makes o_proj/down_proj (OPT: out_proj/fc2) row-parallel with an all-reduce after them, makes
the LM head row-parallel, and divides the `num_heads`/`num_kv_heads` attributes of our attention
modules, so each rank attends over its local heads with its local slice of the KV cache. KV heads
are split whole (AutoTP reads `num_key_value_heads` off `model.config`), so GQA groups stay on one rank.

The TP group is handed to DeepSpeed through an `mpu` object; without it DeepSpeed would build its
own group over global ranks 0..tp-1, which is wrong when several instances share one world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models import CausalLM, LlamaForCausalLM, OPTForCausalLM
from ..models.llama import LlamaDecoderLayer
from ..models.opt import OPTDecoderLayer

# Row-parallel linears per decoder layer. A direct child of the layer is matched as ".name".
ROW_PARALLEL = {
    LlamaForCausalLM: (LlamaDecoderLayer, ("self_attn.o_proj", "mlp.down_proj")),
    OPTForCausalLM: (OPTDecoderLayer, ("self_attn.out_proj", ".fc2")),
}

_DS_GRAIN = 64  # DeepSpeed's preferred shard granularity for MLP/LM-head columns (GPU-friendly sizes)


class TensorParallelError(ValueError):
    """The model's shape cannot be split over this tensor-parallel group."""


class _GroupMPU:
    """The model-parallel-unit interface DeepSpeed accepts, over one existing process group."""

    def __init__(self, group) -> None:
        self._group = group

    def get_model_parallel_group(self):
        return self._group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self._group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self._group)

    def get_data_parallel_group(self):
        return None

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1


def check_shardable(model: CausalLM, tp: int) -> None:
    """Raise TensorParallelError unless heads, KV heads and the MLP divide evenly by `tp`."""
    cfg = model.config
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads), ("ffn size", cfg.ffn_size)):
        if n % tp:
            raise TensorParallelError(f"{cfg.model_type}: {what} ({n}) do not divide by tp={tp}")
    if type(model) not in ROW_PARALLEL:
        raise TensorParallelError(f"no tensor-parallel policy for {type(model).__name__}")


def shard_model(model: CausalLM, group) -> tuple[CausalLM, int]:
    """Shard `model` in place over `group` with DeepSpeed; returns (model, tp size)."""
    tp = dist.get_world_size(group=group)
    if tp == 1:
        return model, 1
    check_shardable(model, tp)
    import deepspeed

    cfg = model.config
    backend = dist.get_backend(group)
    deepspeed.init_distributed(dist_backend=backend)
    if backend == "gloo":
        _use_timed_allreduce()
    layer_cls, row_parallel = ROW_PARALLEL[type(model)]
    even = all(n % (_DS_GRAIN * tp) == 0 for n in (cfg.hidden_size, cfg.ffn_size))
    ds_engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": tp, "tp_group": group, "mpu": _GroupMPU(group),
                         "tp_grain_size": _DS_GRAIN if even else 1},
        dtype=model.lm_head.weight.dtype,
        injection_policy={layer_cls: row_parallel},
        replace_with_kernel_inject=False,
    )
    sharded = ds_engine.module
    sharded.init_buffers()
    return sharded, tp


def _use_timed_allreduce() -> None:
    # On CPU DeepSpeed all-reduces through its shared-memory kernel, which busy-waits on its peers' flags
    # holding the GIL, forever when a peer died, and spans the whole world whatever group it is given.
    # Its own fallback, torch.distributed's gloo all-reduce over the tp group, honours the group's
    # timeout and lets a failed rank surface as an error; the kernel is only taken above level 0.
    from deepspeed.comm import comm

    comm.cdb.shm_vector_kernel_level = 0


def shared_seed(group) -> int:
    """A random seed that every rank of `group` agrees on (rank 0 draws, all receive)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(device)
    src = dist.get_global_rank(group, 0)
    dist.broadcast(seed, src=src, group=group)
    return int(seed.item())
