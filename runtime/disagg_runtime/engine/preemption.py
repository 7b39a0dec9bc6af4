"""Preemption when a decode step cannot get the blocks its sequences grow into.

Policy (vLLM's): the most recently admitted running sequence is preempted first, repeatedly, until the
others fit; preempted sequences resume oldest-admitted first, before any new request is admitted, once
their blocks fit with the watermark to spare.

Two ways to give the memory back, chosen by `PreemptionMode`:
- "swap" (the default): the sequence's KV is copied to (pinned, on a GPU) host memory and copied back
  into fresh blocks on resume. The KV comes back bit for bit, so the tokens that follow are exactly
  those of an uninterrupted run under any numerics, and the cost is one PCIe round trip of the KV
  (Llama-3-8B: 128 KiB per token, ~5 ms per 1k tokens each way at 25 GB/s).
- "recompute": the KV is dropped and rebuilt on resume by prefilling the prompt plus every generated
  token but the last (the last is the next step's input). On a decode instance that is a prefill of the
  whole context on a GPU sized for decode; it costs no host memory, but a prefill's kernels round
  differently from the decode steps that first wrote the KV, so half-precision greedy outputs can
  diverge after a resume. It is the fallback when the swap space is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .kv_cache import PagedKVCache, blocks_for
from .layouts import packed_prompts

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence

PreemptionMode = Literal["swap", "recompute"]
PREEMPTION_MODES: tuple[PreemptionMode, ...] = ("swap", "recompute")
DEFAULT_SWAP_SPACE_BYTES = 4 << 30  # vLLM's default swap space per GPU


@dataclass
class SwappedKV:
    """One preempted sequence's KV in host memory, per layer [num_tokens, kv_heads, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class PreemptionStats:
    """Counters since the engine started (workers export their deltas as metrics)."""

    preemptions: int = 0
    swapped_tokens: int = 0  # KV tokens copied out to host memory
    recomputed_tokens: int = 0  # tokens prefilled again on resume


class HostSwapSpace:
    """A byte budget of host memory for swapped-out KV; copies are pinned when the cache is on a GPU."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"swap space must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used_bytes = 0

    def swap_out(self, cache: PagedKVCache, block_table: list[int], num_tokens: int) -> SwappedKV | None:
        """Copy the first `num_tokens` tokens' KV to host memory; None when the budget cannot hold it."""
        nbytes = cache.bytes_per_token * num_tokens
        if self.used_bytes + nbytes > self.max_bytes:
            return None
        keys, values = cache.read(block_table, num_tokens)
        pin = keys[0].device.type == "cuda"
        kv = SwappedKV([_to_host(k, pin) for k in keys], [_to_host(v, pin) for v in values])
        if pin:
            torch.cuda.current_stream(keys[0].device).synchronize()  # the copies must land before blocks are reused
        self.used_bytes += kv.nbytes
        return kv

    def swap_in(self, cache: PagedKVCache, block_table: list[int], kv: SwappedKV) -> None:
        """Write `kv` back at positions 0.. of `block_table` and free its host memory."""
        cache.write(block_table, kv.keys, kv.values)
        self.drop(kv)

    def drop(self, kv: SwappedKV) -> None:
        self.used_bytes -= kv.nbytes


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if not pin:
        return t if t.device.type == "cpu" else t.cpu()  # cache.read already made a copy
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


# ---- the policy, run on an engine's state -----------------------------------------------------


def grow_or_preempt(engine: Engine) -> None:
    """Give every running sequence the block its next token goes into, preempting the latest admitted."""
    running = engine._running()
    while running and engine.blocks.total_growth(running) > engine.allocator.free:
        victim = max(running, key=lambda s: s.admitted)
        running.remove(victim)
        preempt(engine, victim)
    for seq in running:
        engine.blocks.grow(seq, seq.num_cached + 1)


def preempt(engine: Engine, seq: Sequence) -> None:
    """Take `seq`'s blocks back: its KV swapped to host memory, or dropped to be recomputed on resume."""
    kv = None
    if engine.preemption == "swap":
        kv = engine.swap_space.swap_out(engine.cache, seq.block_table, seq.num_cached)
    engine.preemption_stats.preemptions += 1
    if kv is not None:
        engine.preemption_stats.swapped_tokens += kv.num_tokens
    else:
        seq.num_cached = 0  # recompute from scratch on resume (no swap, or the swap space is full)
    seq.swapped = kv
    seq.preempted = True
    engine._num_preempted += 1
    engine.blocks.free_seq(seq)


def resume(engine: Engine) -> None:
    """Bring back preempted sequences, oldest admitted first, while their blocks fit."""
    waiting = sorted((s for s in engine._seqs.values() if s.preempted), key=lambda s: s.admitted)
    if not waiting:
        return
    # With nothing running, nothing else can grow into the watermark: resume without it, or a
    # sequence whose whole life needs every block would never come back.
    spare = engine.watermark_blocks if engine._running() else 0
    recompute: list[Sequence] = []
    for seq in waiting:
        tokens = seq.swapped.num_tokens if seq.swapped is not None else _context_len(seq)
        need = blocks_for(tokens + 1, engine.block_size)  # + the slot of this step's token
        if need + spare > engine.allocator.free:
            break
        seq.block_table = engine.allocator.allocate(need)
        seq.preempted = False
        engine._num_preempted -= 1
        if seq.swapped is not None:
            engine.swap_space.swap_in(engine.cache, seq.block_table, seq.swapped)
            seq.swapped = None
        else:
            recompute.append(seq)
        spare = engine.watermark_blocks
    if recompute:
        _recompute(engine, recompute)


def _context_len(seq: Sequence) -> int:
    """Tokens whose KV a decode step needs: the prompt and every output token but the last (the input)."""
    return seq.prompt_len + len(seq.output_ids) - 1


def _recompute(engine: Engine, seqs: list[Sequence]) -> None:
    """Rebuild the KV of preempted sequences with one packed prefill; its logits are dropped."""
    contexts = [s.request.prompt_ids + s.output_ids[:-1] for s in seqs]
    lens = [len(c) for c in contexts]
    batch = packed_prompts(engine.cache, seqs, contexts)
    engine._run(batch.tokens, batch.positions, batch.layout, batch.last_rows[:1])
    for s, n in zip(seqs, lens, strict=True):
        s.num_cached = n
    engine.preemption_stats.recomputed_tokens += sum(lens)
