"""Tensor parallelism inside one instance (DeepSpeed AutoTP over a torch.distributed group)."""

from .tp import TensorParallelError, check_shardable, shard_model, shared_seed

__all__ = ["TensorParallelError", "check_shardable", "shard_model", "shared_seed"]
