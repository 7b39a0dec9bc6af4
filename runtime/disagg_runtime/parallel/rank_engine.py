"""Loading one rank's engine: its stage's layers, sharded over its stage's tp ranks, with the instance's seed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine import Engine
from ..engine.engine import _HALF_DTYPES, default_model_id
from ..engine.kv_cache import PagedKVCache
from ..engine.memory import plan_num_blocks
from ..models import load_config, load_model
from ..tokenizer import Tokenizer
from .groups import InstanceGroups
from .pipeline import PipelineStepRunner, StageModel, keep_stage_layers
from .tp import shard_model


def instance_seed(groups: InstanceGroups) -> int:
    """A sampling seed every rank of the instance shares (rank 0 draws it)."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    groups.broadcast(seed, 0, group=groups.control, what="sampling seed")
    return int(seed.item())


def load_rank_engine(model_dir: str | Path, groups: InstanceGroups, *, dtype: torch.dtype | None = None,
                     block_size: int = 16, num_blocks: int | None = None, kv_memory_fraction: float = 0.9,
                     model_id: str | None = None) -> Engine:
    """This rank's engine; every rank of the instance must call it (it runs collectives)."""
    layout, dev = groups.layout, groups.device
    cfg = load_config(model_dir)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else _HALF_DTYPES.get(cfg.torch_dtype or "", torch.bfloat16)
    model = load_model(model_dir, device=dev, dtype=dtype)
    layers = layout.layers(cfg.num_layers)
    if layout.shape.pp > 1:
        keep_stage_layers(model, layers)
    tp = 1
    if groups.stage is not None:
        model, tp = shard_model(model, groups.stage)
    stage = StageModel(model, layout) if layout.shape.pp > 1 else model
    if num_blocks is None:
        per_block = PagedKVCache.bytes_per_block(num_layers=len(layers), block_size=block_size,
                                                 num_kv_heads=cfg.num_kv_heads // tp, head_dim=cfg.head_dim,
                                                 dtype=dtype)
        mine = plan_num_blocks(dev, bytes_per_block=per_block, block_size=block_size, max_context=cfg.max_context,
                               memory_fraction=kv_memory_fraction)
        # Ranks admit in lockstep, so they must have the same number of blocks: the smallest wins.
        num_blocks = min(int(n) for n in groups.gather_objects(mine))
    seed = instance_seed(groups)
    tokenizer = Tokenizer.from_dir(model_dir, eos_token_ids=cfg.eos_token_ids, bos_token_id=cfg.bos_token_id)
    engine = Engine(stage, tokenizer, model_id=model_id or default_model_id(model_dir), num_blocks=num_blocks,
                    block_size=block_size, tp_size=tp, sampling_seed=seed)
    if layout.shape.pp > 1:
        engine.step_runner = PipelineStepRunner(stage, groups, backend=engine.backend, caches=engine.cache.layers,
                                                device=dev, dtype=dtype)
    return engine
