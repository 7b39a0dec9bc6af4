"""Short prefills replayed from CUDA graphs at bucketed token counts.

A prefill of a few hundred tokens is bound by its ~330 launches, not by the GPU: on an H200 an 8B model's
prefill took 14-15 ms at 128-512 tokens (bench/results/engine_h200-profile.json), against ~4-12 ms of
kernels, because the host spends ~40 us launching each cuBLAS call and ~20 us each Triton kernel. So, as
for decode, each bucket in `PREFILL_GRAPH_TOKENS` is captured once over static inputs, and a prefill whose
packed prompts fit a bucket (at most `PREFILL_GRAPH_SEQS` prompts) pads to it and replays. Padding rows
attend to nothing (they are in no prompt of `cu_seqlens`), store nothing (slot -1) and every other kernel
is row-wise, so they cannot reach a real row; padding prompts have length 0. Up to a few hundred tokens
a prefill costs about one read of the weights whatever its token count; from 512 on the padding (at most
31 tokens to 1024, 63 to 2048) is at most 6%, then 3%, of the work.

Past 512 tokens an eager prefill's launches mostly hide behind its GPU work from an idle engine, but not in
a served colocated worker under load: its engine thread launches them while the event loop competes for
the interpreter. Traced there, 700-800-token prefills of an 8B model on an H200 took 11-33 ms (10th-90th
percentile) just to launch, where the whole prefill from an idle engine takes ~20 ms; the slow ones left
the device idle (bench/NOTES-gpu.md section 10). So buckets go on to 2048 tokens; longer prefills run eager, their GPU work outlasting the
launches even on a contended host.

A graph runs no per-layer hook, so a prefill-only request's KV would be staged after the forward
(`KVExporter._finish`), not layer by layer. A prefill whose KV streams out (`streamed`) therefore replays a
graph only up to `STREAMED_GRAPH_TOKENS`, where the whole forward takes a few ms; past it, it runs eager and
each layer's KV leaves as soon as it is computed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import StepLayout
from .capture import capture
from .fused_llama import FusedLlama

# Every 32 tokens up to 1024, then every 64 up to 2048: at most 31 or 63 padding tokens.
PREFILL_GRAPH_TOKENS = tuple(range(32, 1025, 32)) + tuple(range(1088, 2049, 64))
PREFILL_GRAPH_SEQS = 16
# The longest prefill replayed when its KV streams out layer by layer (see the module doc).
STREAMED_GRAPH_TOKENS = 512


def pack_prefill_inputs(host: np.ndarray, offsets: tuple[int, ...], tokens: list[int], positions: list[int],
                        slots: list[int], seq_lens: list[int], rows: list[int]) -> None:
    """A prefill's int64 inputs laid out for one host-to-device copy: ids, positions, slots, logit rows and
    cu_seqlens from `offsets[0..4]` (`offsets[5]` ends it). Where a region is longer than its values the
    rest is padding: id and position 0, slot -1 (stores nothing), row 0, and empty prompts after the last."""
    o, n, r = offsets, len(tokens), len(rows)
    host[o[0]:o[0] + n] = tokens
    host[o[1]:o[1] + n] = positions
    host[o[2]:o[2] + n] = slots
    host[o[0] + n:o[1]] = 0
    host[o[1] + n:o[2]] = 0
    host[o[2] + n:o[3]] = -1
    host[o[3]:o[3] + r] = rows
    host[o[3] + r:o[4]] = 0
    cu = host[o[4]:o[5]]
    cu[0] = 0
    np.cumsum(seq_lens, out=cu[1:1 + len(seq_lens)])
    cu[1 + len(seq_lens):] = n


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # static output [PREFILL_GRAPH_SEQS, vocab], float32


class PrefillGraphs:
    """Captured prefill forwards of a `FusedLlama`, one per token bucket, and their replay."""

    def __init__(self, fused: FusedLlama, *, token_buckets: tuple[int, ...] = PREFILL_GRAPH_TOKENS,
                 max_seqs: int = PREFILL_GRAPH_SEQS) -> None:
        self.fused = fused
        self.device = fused.device
        self.buckets = sorted(token_buckets)
        self.max_seqs = max_seqs
        t, s = self.buckets[-1], max_seqs
        # One int64 buffer: ids, positions, slots (t each), logit rows (s), cu_seqlens (s + 1); host side pinned
        # and double-buffered like the decode runner's, so a fill never races a copy still queued.
        self._offsets = (0, t, 2 * t, 3 * t, 3 * t + s, 3 * t + 2 * s + 1)
        self._hosts = [torch.zeros(self._offsets[-1], dtype=torch.long).pin_memory() for _ in range(2)]
        self._turn = 0
        self._inputs = torch.zeros(self._offsets[-1], dtype=torch.long, device=self.device)
        self._graphs: dict[int, _Graph] = {}
        self._capture()

    def _capture(self) -> None:
        host = self._hosts[0].numpy()
        pool = torch.cuda.graph_pool_handle()
        for tokens in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool memory
            # Placeholder inputs: position 0 is in any model's RoPE table, slot -1 stores nothing.
            pack_prefill_inputs(host, self._offsets, [0] * tokens, [0] * tokens, [-1] * tokens, [tokens], [tokens - 1])
            self._inputs.copy_(self._hosts[0])
            self._graphs[tokens] = _Graph(*capture(lambda tokens=tokens: self._forward(tokens), self.device, pool))
        torch.cuda.synchronize(self.device)

    def _forward(self, tokens: int) -> torch.Tensor:
        o = self._offsets
        ids, pos, slots = (self._inputs[o[i]:o[i] + tokens] for i in range(3))
        # max_seqlen = the bucket: attention's grid is fixed; programs past a prompt's end return at once.
        return self.fused.prefill_logits(ids, pos, slots, self._inputs[o[4]:o[5]].to(torch.int32), tokens,
                                         self._inputs[o[3]:o[4]])

    def _bucket(self, tokens: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, tokens)]

    def fits(self, num_tokens: int, num_seqs: int, *, streamed: bool = False) -> bool:
        """Whether a prefill of this many packed tokens and prompts replays a graph; `streamed`: its KV
        leaves layer by layer, which only an eager prefill does past `STREAMED_GRAPH_TOKENS`."""
        limit = min(self.buckets[-1], STREAMED_GRAPH_TOKENS) if streamed else self.buckets[-1]
        return 0 < num_tokens <= limit and num_seqs <= self.max_seqs

    def run(self, tokens: list[int], positions: list[int], layout: StepLayout, rows: list[int]) -> torch.Tensor:
        """Float32 logits [len(rows), vocab] of a prefill that `fits` (whole prompts, no cached prefix)."""
        self._turn ^= 1
        host = self._hosts[self._turn]
        pack_prefill_inputs(host.numpy(), self._offsets, tokens, positions, layout.slot_mapping, layout.seq_lens,
                            rows)
        self._inputs.copy_(host, non_blocking=True)
        g = self._graphs[self._bucket(len(tokens))]
        g.graph.replay()
        return g.logits[:len(rows)]
