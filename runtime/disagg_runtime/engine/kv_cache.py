"""Paged KV cache: fixed-size blocks handed out from a free list, one block table per sequence.

Each layer holds K and V tensors of shape [num_blocks, block_size, kv_heads, head_dim]; a token's
slot is `block * block_size + offset`. Sequences get blocks as they grow (`block_manager.py`); when a
decode step cannot get them the engine preempts (`preemption.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import LayerKV
from .types import KVCacheFull


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Free list of block ids; allocation is all-or-nothing."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # Lowest ids first keeps a small working set in low memory (friendlier to caches and debugging).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks, or KVCacheFull (and nothing taken) if fewer are free."""
        if n > len(self._free):
            raise KVCacheFull(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        taken = [self._free.pop() for _ in range(n)]
        return taken

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """The per-layer K/V block tensors plus copying one sequence's KV in and out (for export/import)."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.layers = [LayerKV(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes of K and V for one block across all layers."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, block_table: Sequence[int], start: int, end: int) -> list[int]:
        """Flat slots of token positions [start, end) of a sequence owning `block_table`."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def read(self, block_table: Sequence[int], num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the first `num_tokens` tokens' K and V per layer, each [num_tokens, kv_heads, head_dim]."""
        idx = torch.tensor(self.slots(block_table, 0, num_tokens), dtype=torch.long,
                           device=self.layers[0].keys.device)
        keys, values = [], []
        for layer in self.layers:
            keys.append(layer.keys.view(-1, self.num_kv_heads, self.head_dim).index_select(0, idx))
            values.append(layer.values.view(-1, self.num_kv_heads, self.head_dim).index_select(0, idx))
        return keys, values

    def write(self, block_table: Sequence[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Place per-layer K/V [num_tokens, kv_heads, head_dim] at positions 0.. of the sequence."""
        num_tokens = keys[0].shape[0]
        device = self.layers[0].keys.device
        idx = torch.tensor(self.slots(block_table, 0, num_tokens), dtype=torch.long, device=device)
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            layer.keys.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, idx, k.to(device))
            layer.values.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, idx, v.to(device))
