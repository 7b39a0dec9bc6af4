"""KV blocks on demand: admission by the prompt plus a watermark, then one block at a time as a sequence grows.

A whole-life reservation (prompt + max_tokens) holds memory a request may never use: clients leave
max_tokens at the rest of the context or far above what they generate. Here a request is admitted when
its prompt's blocks fit with `watermark_blocks` to spare, the slack that lets the running batch cross
its next block boundaries without preempting at once (vLLM's watermark, 1% of the cache by default).
A decode step then asks for the blocks its sequences grow into; when they are not free, the engine
preempts (see `preemption.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .kv_cache import BlockAllocator, blocks_for
from .sequence import Sequence

DEFAULT_WATERMARK = 0.01


def watermark_blocks(num_blocks: int, watermark: float) -> int:
    """Blocks kept free at admission: `watermark` of the cache, at least one unless the watermark is 0."""
    if not 0 <= watermark < 1:
        raise ValueError(f"kv watermark must be in [0, 1), got {watermark}")
    return math.ceil(watermark * num_blocks) if watermark > 0 else 0


class BlockManager:
    """Hands blocks to sequences as they grow, over one `BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator, *, block_size: int, watermark: float = DEFAULT_WATERMARK) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.watermark_blocks = watermark_blocks(allocator.num_blocks, watermark)

    @property
    def free(self) -> int:
        return self.allocator.free

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def fits_with_watermark(self, blocks: int) -> bool:
        """Whether `blocks` more can be taken and leave the watermark free."""
        return blocks + self.watermark_blocks <= self.allocator.free

    def growth(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def total_growth(self, seqs: Iterable[Sequence], extra_tokens: int = 1) -> int:
        """Blocks the sequences lack to hold `extra_tokens` more tokens each."""
        return sum(self.growth(s, s.num_cached + extra_tokens) for s in seqs)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend `seq`'s block table to hold `num_tokens` tokens (KVCacheFull, nothing taken, if it cannot)."""
        need = self.growth(seq, num_tokens)
        if need:
            seq.block_table.extend(self.allocator.allocate(need))

    def free_seq(self, seq: Sequence) -> None:
        """Give back every block of `seq`."""
        self.allocator.release(seq.block_table)
        seq.block_table = []
