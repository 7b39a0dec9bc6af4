"""The engine's GPU step runner: fused Llama forwards, with the decode step replayed from CUDA graphs.

A decode step of an 8B model on an H100 is ~5 ms of weight streaming split over ~400 kernels; launched
one by one from Python the launches alone take longer than the GPU work. So each decode batch size in
`CAPTURE_SIZES` is captured once as a CUDA graph over static input buffers; a step pads its batch to
the next captured size (padding rows: slot -1 stores nothing, context 0 attends to nothing), copies its
inputs into the buffers with one host-to-device copy, and replays. Prefills of up to 2048 tokens replay
graphs too (up to 512 when their KV streams out layer by layer; prefill_graphs.py); longer ones run eager,
where the launches hide behind the GPU work.

Overlapped decoding (engine/overlap.py) launches a step before the one before it has run, so the host
side of every asynchronous copy is double-buffered: the buffer a step fills is never one whose copy may
still be queued. A step's input ids that only the device knows yet (sampled by the step before) are
gathered on the device after the copy.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import StepLayout
from ..overlap import gathered
from .capture import capture
from .fused_llama import FusedLlama
from .prefill_graphs import PREFILL_GRAPH_TOKENS, PrefillGraphs, pack_prefill_inputs

# Up to the planner's largest profiled decode batch: an eager step at batch 256 of Llama-3-8B took 20-26 ms
# on an H200 against 16 ms replayed, and those samples bent the profile's decode fit ~10% slow at batch
# 64-128. The sizes between powers of two keep padding under a third of a step's rows.
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # static output [size, vocab], float32


class GpuStepRunner:
    """Runs the engine's steps (a `StepLayout` plus token ids and positions) on a `FusedLlama`."""

    def __init__(self, fused: FusedLlama, *, block_size: int, max_context: int, cuda_graphs: bool = True,
                 capture_sizes: tuple[int, ...] = CAPTURE_SIZES,
                 prefill_buckets: tuple[int, ...] = PREFILL_GRAPH_TOKENS) -> None:
        self.fused = fused
        self.device = fused.device
        self.block_size = block_size
        self.max_blocks = -(-max_context // block_size)
        self.sizes = sorted(capture_sizes) if cuda_graphs and self.device.type == "cuda" and fused.graph_safe else []
        self._graphs: dict[int, _Graph] = {}
        self._last_size: int | None = None
        self._prefill_inputs = _HostInputs(self.device)
        if self.sizes:
            self._capture()
        self.prefill_graphs = PrefillGraphs(fused, token_buckets=prefill_buckets) \
            if self.sizes and prefill_buckets else None

    # ---- static buffers and capture ---------------------------------------------------------------
    def _capture(self) -> None:
        biggest = self.sizes[-1]
        # Rows: token ids, positions, cache slots, context lengths, and the row of the previous step's
        # sampled ids a token comes from (-1: the host's). Pinned host mirrors, one copy per step.
        self._hosts = [torch.zeros(5, biggest, dtype=torch.long).pin_memory() for _ in range(2)]
        self._host_tables_bufs = [torch.zeros(biggest, self.max_blocks, dtype=torch.int32).pin_memory()
                                  for _ in range(2)]
        self._turn = 0
        self._select(0)
        self._inputs = torch.zeros(5, biggest, dtype=torch.long, device=self.device)
        self._tables = torch.zeros(biggest, self.max_blocks, dtype=torch.int32, device=self.device)
        self._last_tables: list[list[int]] = []
        self._pad(0, biggest)
        self._inputs.copy_(self._host)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            args = self._static_args(size)
            self._graphs[size] = _Graph(*capture(lambda args=args: self.fused.decode_logits(*args), self.device,
                                                 pool))
        torch.cuda.synchronize(self.device)

    def _select(self, turn: int) -> None:
        self._host = self._hosts[turn]
        self._host_np = self._host.numpy()
        self._host_tables = self._host_tables_bufs[turn]
        self._host_tables_np = self._host_tables.numpy()

    def _static_args(self, size: int):
        from ...kernels.triton_paged_decode import default_num_splits

        ids, pos, slots, ctx = self._inputs[:4, :size]
        return ids, pos, slots, self._tables[:size], ctx, default_num_splits(size, self.fused.num_kv_heads,
                                                                               self.device)

    def _pad(self, start: int, end: int) -> None:
        self._host_np[0, start:end] = 0
        self._host_np[1, start:end] = 0
        self._host_np[2, start:end] = -1
        self._host_np[3, start:end] = 0
        self._host_np[4, start:end] = -1

    # ---- steps ------------------------------------------------------------------------------------
    def run(self, tokens: list[int], positions: list[int], layout: StepLayout, rows: list[int],
            gather: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """Float32 logits [len(rows), vocab] of the step's tokens at `rows`.

        `gather` = (ids on the device, src): decode token i is ids[src[i]] where src[i] >= 0.
        """
        with torch.inference_mode():
            if layout.is_prefill:
                if gather is not None:
                    raise ValueError("prefill tokens are all known to the host; nothing to gather")
                return self._prefill(tokens, positions, layout, rows)
            size = self._graph_size(len(tokens))
            if size is None:
                logits = self._decode_eager(tokens, positions, layout, gather)
            else:
                logits = self._replay(size, tokens, positions, layout, gather)
            return logits if len(rows) == len(tokens) else logits[self._tensor(rows)]

    def _graph_size(self, batch: int) -> int | None:
        i = bisect.bisect_left(self.sizes, batch)
        return self.sizes[i] if i < len(self.sizes) else None

    def _replay(self, size: int, tokens: list[int], positions: list[int], layout: StepLayout,
                gather: tuple[torch.Tensor, list[int]] | None) -> torch.Tensor:
        b = len(tokens)
        self._turn ^= 1
        self._select(self._turn)
        h = self._host_np
        h[0, :b] = tokens
        h[1, :b] = positions
        h[2, :b] = layout.slot_mapping
        h[3, :b] = layout.context_lens
        h[4, :b] = gather[1] if gather is not None else -1
        self._pad(b, size)
        # Block tables change only when a request joins, leaves, is preempted or grows into a new block
        # (every block_size steps): copy them only then.
        if layout.block_tables != self._last_tables:
            for i, table in enumerate(layout.block_tables):
                self._host_tables_np[i, :len(table)] = table
            self._tables[:b].copy_(self._host_tables[:b], non_blocking=True)
            self._last_tables = [list(t) for t in layout.block_tables]
        self._inputs[:, :size].copy_(self._host[:, :size], non_blocking=True)
        if gather is not None:
            src = self._inputs[4, :b]
            self._inputs[0, :b] = torch.where(src >= 0, gather[0][src.clamp(min=0)], self._inputs[0, :b])
        g = self._graphs[size]
        g.graph.replay()
        self._last_size = size
        return g.logits[:b]

    @property
    def can_replay(self) -> bool:
        """Whether `replay_last` has a step to repeat."""
        return self._last_size is not None

    def replay_last(self) -> None:
        """Replay the last decode step's graph on the inputs still in the static buffers (for timing the
        GPU step alone). It recomputes the same tokens and rewrites the same KV slots with the same values."""
        if self._last_size is None:
            raise RuntimeError("no decode step has been replayed yet")
        self._graphs[self._last_size].graph.replay()

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _decode_eager(self, tokens: list[int], positions: list[int], layout: StepLayout,
                      gather: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        width = max(len(t) for t in layout.block_tables)
        tables = np.zeros((len(tokens), width), dtype=np.int32)
        for i, table in enumerate(layout.block_tables):
            tables[i, :len(table)] = table
        ids = self._tensor(tokens)
        if gather is not None:
            ids = gathered(ids, *gather)
        return self.fused.decode_logits(ids, self._tensor(positions),
                                        self._tensor(layout.slot_mapping),
                                        torch.from_numpy(tables).to(self.device),
                                        self._tensor(layout.context_lens))

    def _prefill(self, tokens: list[int], positions: list[int], layout: StepLayout, rows: list[int]) -> torch.Tensor:
        if layout.context_lens != layout.seq_lens:
            raise ValueError("the GPU runner prefills whole prompts only (no cached prefix)")
        # A graph has one logits row per prompt slot: a caller asking for more rows runs eager.
        streamed = self.fused.after_prefill_layer is not None  # a prefill-only request's KV, layer by layer
        if self.prefill_graphs is not None and self.prefill_graphs.fits(len(tokens), max(len(layout.seq_lens),
                                                                                         len(rows)), streamed=streamed):
            return self.prefill_graphs.run(tokens, positions, layout, rows)
        n, r, s = len(tokens), len(rows), len(layout.seq_lens)
        # One host buffer, one copy: four pageable copies each left the GPU idle for 0.1-0.5 ms before the
        # first layer on an H200 (bench/prefill_breakdown.py), up to 1.5 ms of a 4k-token prefill.
        o = (0, n, 2 * n, 3 * n, 3 * n + r, 3 * n + r + s + 1)
        host = self._prefill_inputs.take(o[-1])
        pack_prefill_inputs(host.numpy(), o, tokens, positions, layout.slot_mapping, layout.seq_lens, rows)
        dev = self._prefill_inputs.upload(host)
        return self.fused.prefill_logits(dev[o[0]:o[1]], dev[o[1]:o[2]], dev[o[2]:o[3]], dev[o[4]:].to(torch.int32),
                                         max(layout.seq_lens), dev[o[3]:o[4]])


class _HostInputs:
    """A reusable host buffer for a step's int64 inputs and its one copy to the device: pinned on CUDA, so the
    copy is asynchronous, and refilled only once the device has read the last copy out of it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buf = torch.empty(0, dtype=torch.long)
        self._copied: torch.cuda.Event | None = None

    def take(self, n: int) -> torch.Tensor:
        """The first `n` elements of the buffer (grown when short), safe to overwrite."""
        if self._copied is not None:
            self._copied.synchronize()
        if self._buf.numel() < n:
            size = max(n, 2 * self._buf.numel())
            buf = torch.empty(size, dtype=torch.long)
            self._buf = buf.pin_memory() if self.device.type == "cuda" else buf
        return self._buf[:n]

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """`host` (a slice from `take`) on the device."""
        if self.device.type != "cuda":
            return host.clone()
        dev = host.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return dev
