"""The inputs of the engine's two plain step shapes: packed prompts from position 0, and one token per sequence.

Prefill, recompute after preemption, and the decode step (synchronous or overlapped) all lay their batch
out this way; chunked mixed steps build their own (engine/chunked.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from .attention import StepLayout

if TYPE_CHECKING:
    from .kv_cache import PagedKVCache
    from .sequence import Sequence


@dataclass(frozen=True)
class PackedPrompts:
    """Token ids, positions and layout of prompts packed into one forward, and each one's last row."""

    tokens: list[int]
    positions: list[int]
    layout: StepLayout
    last_rows: list[int]


def packed_prompts(cache: PagedKVCache, seqs: list[Sequence], prompts: list[list[int]]) -> PackedPrompts:
    """`prompts[i]` written into `seqs[i]`'s blocks from position 0."""
    lens = [len(p) for p in prompts]
    layout = StepLayout(
        is_prefill=True, seq_lens=lens, context_lens=lens, block_tables=[s.block_table for s in seqs],
        slot_mapping=[slot for s, n in zip(seqs, lens, strict=True) for slot in cache.slots(s.block_table, 0, n)],
        block_size=cache.block_size)
    return PackedPrompts(tokens=[t for p in prompts for t in p], positions=[i for n in lens for i in range(n)],
                         layout=layout, last_rows=[end - 1 for end in accumulate(lens)])


def decode_layout(cache: PagedKVCache, seqs: list[Sequence]) -> tuple[StepLayout, list[int]]:
    """Layout and positions of one new token per sequence, at its `num_cached`."""
    layout = StepLayout(
        is_prefill=False, seq_lens=[1] * len(seqs), context_lens=[s.num_cached + 1 for s in seqs],
        block_tables=[s.block_table for s in seqs],
        slot_mapping=[cache.slots(s.block_table, s.num_cached, s.num_cached + 1)[0] for s in seqs],
        block_size=cache.block_size)
    return layout, [s.num_cached for s in seqs]
