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
from typing import Literal

import torch

from .kv_cache import PagedKVCache

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
