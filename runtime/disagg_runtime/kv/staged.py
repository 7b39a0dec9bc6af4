"""A request's KV staged for sending: every layer's K and V, already in the raw wire layout, in one buffer.

The prefill engine fills it layer by layer while its forward runs (engine/kv_export.py), so when the
first token is out the payload is ready: a pull ships byte ranges of this buffer (one frame, one copy)
instead of gathering cache blocks per layer per pull. A pull that arrives while layers are still being
computed waits for each next layer (`wait_ready`) and ships the layers that are there.

Wire layout (also what the channels put on the wire for any codec): a layer is its encoded parts back to
back, each starting on an ALIGN-byte boundary; layers follow each other. For the raw codec the parts are
K then V, each (num_tokens, num_kv_heads, head_dim).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import torch

from .errors import KVChannelError
from .payload import TORCH_DTYPES, KVHeader, KVPayload

# Parts start on 16-byte boundaries so every dtype's view of a wire buffer is aligned.
ALIGN = 16


class KVStagingError(KVChannelError):
    """The forward that was staging a request's KV failed; the KV will never be complete."""


def padded(nbytes: int) -> int:
    """`nbytes` rounded up to the wire alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One layer's parts in the wire layout, as a new uint8 tensor on the parts' device."""
    sizes = [p.numel() * p.element_size() for p in parts]
    out = torch.empty(sum(padded(n) for n in sizes), dtype=torch.uint8, device=parts[0].device)
    offset = 0
    for p, n in zip(parts, sizes, strict=True):
        out[offset:offset + n].copy_(p.contiguous().reshape(-1).view(torch.uint8))
        offset += padded(n)
    return out


def pack_layers(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Layers' parts, each stacked on a leading layer dim, in the wire layout: one uint8 tensor, one copy per
    part (not per part per layer)."""
    layers = parts[0].shape[0]
    sizes = [p[0].numel() * p.element_size() for p in parts]
    out = torch.empty(layers, sum(padded(n) for n in sizes), dtype=torch.uint8, device=parts[0].device)
    offset = 0
    for p, n in zip(parts, sizes, strict=True):
        out[:, offset:offset + n].copy_(p.reshape(layers, -1).view(torch.uint8))
        offset += padded(n)
    return out.view(-1)


def unpack_layers(buffer: torch.Tensor, layers: int,
                  shapes: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Views (no copy) of `layers` layers' parts in a uint8 wire buffer, each part stacked on a leading dim."""
    grid = buffer.view(layers, -1)
    out, offset = [], 0
    for dtype, shape in shapes:
        n = torch.Size(shape).numel() * dtype.itemsize
        out.append(grid[:, offset:offset + n].view(dtype).view(layers, *shape))
        offset += padded(n)
    return out


def staged_nbytes(header: KVHeader) -> int:
    """Bytes of a raw staging (and of its wire form) for `header`: every layer's K and V, each part padded."""
    n, h, d = header.layer_shape
    return header.num_layers * 2 * padded(n * h * d * TORCH_DTYPES[header.dtype].itemsize)


class StagedKV:
    """One request's raw KV in the wire layout, filled layer by layer on one thread and sent from another.

    The producing thread copies layer i into `key(i)` / `value(i)` (on the device's current stream), then
    calls `mark_ready(i + 1)`; senders await `wait_ready` and, on a GPU, `device_wait` before reading.
    """

    def __init__(self, header: KVHeader, device: torch.device | str, *, buffer: torch.Tensor | None = None) -> None:
        """`buffer`: uint8 memory of exactly `staged_nbytes(header)` bytes to stage into (else allocated)."""
        self.header = header
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[header.dtype]
        n, h, d = header.layer_shape
        self.part_bytes = n * h * d * self.dtype.itemsize
        self.part_stride = padded(self.part_bytes)
        self.layer_bytes = 2 * self.part_stride
        nbytes = header.num_layers * self.layer_bytes
        if buffer is not None and (buffer.dtype != torch.uint8 or buffer.numel() != nbytes
                                   or buffer.device.type != self.device.type):
            raise ValueError(f"a staging buffer for {header.request_id} must be {nbytes} uint8 bytes on {self.device}")
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if buffer is None else buffer
        self._ready = 0
        self._error: BaseException | None = None
        self._events: list[torch.cuda.Event] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[int]]] = []

    @property
    def nbytes(self) -> int:
        """Device memory this staging holds."""
        return self.buffer.numel()

    @property
    def ready(self) -> int:
        """Layers staged so far."""
        return self._ready

    @property
    def complete(self) -> bool:
        return self._ready == self.header.num_layers

    def _part(self, layer: int, which: int) -> torch.Tensor:
        start = layer * self.layer_bytes + which * self.part_stride
        return self.buffer[start:start + self.part_bytes].view(self.dtype).view(self.header.layer_shape)

    def key(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K slot (a view of the buffer) to copy into or read from."""
        return self._part(layer, 0)

    def value(self, layer: int) -> torch.Tensor:
        return self._part(layer, 1)

    def layers(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layers [start, end), each (layers, tokens, heads, dim): strided views of the buffer."""
        grid = self.buffer.view(self.header.num_layers, 2, self.part_stride)[start:end, :, :self.part_bytes]
        shape = (end - start, *self.header.layer_shape)
        return grid[:, 0].view(self.dtype).view(shape), grid[:, 1].view(self.dtype).view(shape)

    def wire(self, start: int, end: int) -> torch.Tensor:
        """The wire bytes of layers [start, end) (a view)."""
        return self.buffer[start * self.layer_bytes:end * self.layer_bytes]

    # ---- producer side ----------------------------------------------------------------------------
    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy one layer's K and V in (the producer then calls `mark_ready`)."""
        self.key(layer).copy_(k)
        self.value(layer).copy_(v)

    def mark_ready(self, layers: int) -> None:
        """Layers [0, layers) are staged (their copies enqueued on this thread's current stream)."""
        if not 0 < layers <= self.header.num_layers or layers < self._ready:
            raise ValueError(f"request {self.header.request_id}: cannot mark {layers} of "
                             f"{self.header.num_layers} layers ready after {self._ready}")
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events.extend([event] * (layers - len(self._events)))
        with self._lock:
            self._ready = layers
            due = [w for w in self._waiters if w[0] <= layers]
            self._waiters = [w for w in self._waiters if w[0] > layers]
        for _, loop, fut in due:
            loop.call_soon_threadsafe(_resolve, fut, layers)

    def fail(self, error: BaseException) -> None:
        """The forward that was filling this staging failed: waiting senders get `error`."""
        with self._lock:
            self._error = error
            due, self._waiters = self._waiters, []
        for _, loop, fut in due:
            loop.call_soon_threadsafe(_reject, fut, error)

    # ---- sender side ------------------------------------------------------------------------------
    async def wait_ready(self, at_least: int) -> int:
        """Wait until at least `at_least` layers are staged; returns how many are."""
        with self._lock:
            if self._error is not None:
                raise KVStagingError(f"KV of {self.header.request_id} could not be staged: {self._error}")
            if self._ready >= at_least:
                return self._ready
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[int] = loop.create_future()
            self._waiters.append((at_least, loop, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the producer's failure, surfaced as a KV error
            raise KVStagingError(f"KV of {self.header.request_id} could not be staged: {e}") from e

    def event(self, layers: int) -> torch.cuda.Event | None:
        """The CUDA event that completes when layers [0, layers) are staged (None off the GPU)."""
        return self._events[layers - 1] if self.device.type == "cuda" and layers else None

    def device_wait(self, layers: int) -> None:
        """Make the current stream wait for the copies of layers [0, layers) (a no-op off the GPU)."""
        if self.device.type == "cuda" and layers:
            torch.cuda.current_stream(self.device).wait_event(self._events[layers - 1])

    def to_payload(self) -> KVPayload:
        """The staged layers as a KVPayload of views (valid while this staging is alive)."""
        if not self.complete:
            raise KVChannelError(f"KV of {self.header.request_id}: {self._ready} of {self.header.num_layers} "
                                 "layers staged")
        layers = range(self.header.num_layers)
        return KVPayload(self.header, [self.key(i) for i in layers], [self.value(i) for i in layers])

    @classmethod
    def of(cls, payload: KVPayload) -> StagedKV:
        """A complete staging holding a copy of `payload` (tests, benchmarks, sources without a hook)."""
        payload.check()
        staged = cls(payload.header, payload.keys[0].device)
        for i, (k, v) in enumerate(zip(payload.keys, payload.values, strict=True)):
            staged.stage(i, k, v)
        staged.mark_ready(payload.header.num_layers)
        return staged


def _resolve(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future[int], error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
