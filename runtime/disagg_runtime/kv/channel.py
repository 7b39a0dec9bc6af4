"""The KVChannel interface: one established prefill -> decode link that ships KV payloads.

Every channel shares the control protocol on a framed TCP stream: `begin` (the header), then one
`layers` message per batch of consecutive layers (which layers, their parts), each followed by the
batch's bytes on the data plane, then the receiver's `ack`. Only the data plane differs (the same TCP
stream, a torch.distributed group, or a CUDA IPC staging buffer). A staged payload (kv/staged.py) goes
out as one batch when it is complete, or as the layers that are ready while a forward still computes
the rest; a plain layer stream goes out one layer per batch as its iterator yields them. So the cost
of a pull is a handful of control frames and one copy per batch, not a frame and a copy per layer.
The receiver checks the header against what it expects and every batch's declared parts against the
header before reading any tensor bytes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import ValidationError

from .codec import LayerCodec, PartSpec, make_codec
from .errors import KVChannelError, KVForbidden, KVMismatchError, KVNotFound, KVTimeout
from .framing import FramedStream
from .payload import TORCH_DTYPES, KVHeader, KVPayload
from .staged import KVStagingError, StagedKV, pack, pack_layers, padded, unpack_layers

ChannelKind = Literal["tcp", "ipc", "nccl"]
LayerStream = AsyncIterable[tuple[torch.Tensor, torch.Tensor]]
# What a sender ships from: a staged payload, or any stream of (K, V) layers.
LayerSource = LayerStream | StagedKV


@dataclass(frozen=True)
class TransferStats:
    """One payload's transfer, as the sender or the receiver saw it."""

    request_id: str
    channel: ChannelKind
    codec: str
    layers: int
    wire_bytes: int
    raw_bytes: int
    seconds: float
    batches: int = 1
    direct: bool = False  # read out of the prefill's staging arena (kv/arena.py), not sent by it


@dataclass(frozen=True)
class _Batch:
    start: int
    count: int
    wire: torch.Tensor  # uint8, the batch's layers in the wire layout
    parts: list[dict]  # one layer's part specs, as on the wire
    # Completes when `wire` is written (a staging's layer event); None: it was made on the current stream.
    ready: torch.cuda.Event | None = None


@dataclass(frozen=True)
class _Plan:
    """One layer's wire layout under a codec: part specs, as on the wire, padded and unpadded bytes."""

    specs: list[PartSpec]
    wire_specs: list[dict]
    layer_bytes: int  # with each part padded to ALIGN: a layer's stride in the wire buffer
    wire_bytes: int  # the parts' own bytes (what the stats count as moved)


_MAX_PLANS = 256


async def payload_layers(payload: KVPayload) -> AsyncIterator[tuple[torch.Tensor, torch.Tensor]]:
    """A finished payload as a layer stream."""
    for k, v in zip(payload.keys, payload.values, strict=True):
        yield k, v


def _layers_of(placed: torch.Tensor, header: KVHeader, codec: LayerCodec,
               specs: list[PartSpec]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V out of a landed wire buffer: views for the raw codec, decoded tensors otherwise."""
    if codec.name == "none" and all(s.nbytes == padded(s.nbytes) for s in specs):
        # No padding between parts: the buffer is [layer, K|V, tokens, heads, dim]; two C calls, no loop.
        grid = placed.view(TORCH_DTYPES[header.dtype]).view(header.num_layers, 2, *header.layer_shape)
        return list(grid[:, 0].unbind(0)), list(grid[:, 1].unbind(0))
    # All layers at once: a few tensor ops per pull, not per layer.
    keys, values = codec.decode_many(unpack_layers(placed, header.num_layers, [(s.dtype, s.shape) for s in specs]),
                                     header)
    return list(keys.unbind(0)), list(values.unbind(0))


def _remote_error(message: dict) -> KVChannelError:
    text = str(message.get("message", "no message"))
    code = message.get("code")
    if code == "not_found":
        return KVNotFound(text)
    if code == "forbidden":
        return KVForbidden(text)
    if code == "mismatch":
        return KVMismatchError(text)
    if code == "timeout":
        return KVTimeout(text)
    return KVChannelError(f"KV peer reported: {text}")


class KVChannel(ABC):
    """A connected link; `send` on the prefill end, `recv` on the decode end, one payload at a time."""

    kind: ClassVar[ChannelKind]

    def __init__(self, stream: FramedStream, *, codec: LayerCodec) -> None:
        self.stream = stream
        self.codec = codec
        self.broken = False
        self._plans: dict[tuple, _Plan] = {}

    def _plan(self, codec: LayerCodec, header: KVHeader) -> _Plan:
        """The wire layout for `header` under `codec`, kept per link (pulls of one model repeat the shapes)."""
        key = (codec.name, getattr(codec, "block_tokens", None), header.dtype, header.layer_shape)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:  # prompt lengths vary: keep the memo bounded
                self._plans.clear()
            specs = codec.part_specs(header)
            plan = self._plans[key] = _Plan(specs, [s.to_wire() for s in specs], sum(padded(s.nbytes) for s in specs),
                                            sum(s.nbytes for s in specs))
        return plan

    # ---- data plane (per kind) ----------------------------------------------------------------------
    @abstractmethod
    def _landing(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The uint8 buffer a whole payload's wire bytes land in (on the data plane's device)."""

    async def _stage_out(self, wire: torch.Tensor, offset: int, total: int,
                         ready: torch.cuda.Event | None) -> dict:
        """Sender, before a batch's `layers` message: prepare `wire` (bytes [offset, offset + len) of a
        `total`-byte payload, written once `ready` completes); returns fields the message carries to the
        receiver's `_land`."""
        return {}

    @abstractmethod
    async def _ship(self, wire: torch.Tensor, fields: dict) -> None:
        """Sender, after the `layers` message: put the batch's bytes on the data plane."""

    @abstractmethod
    async def _land(self, out: torch.Tensor, offset: int, msg: dict) -> None:
        """Receiver: fill `out` (bytes [offset, offset + len) of the landing buffer) with one batch."""

    async def _settle(self, device: torch.device) -> None:
        """Receiver, before the ack: every landed byte is in place (the sender may reuse its buffers)."""
        return None  # the byte-stream planes land synchronously

    def _pull_done(self) -> None:
        """Sender, after the ack: the receiver has every byte, so buffers held for the copies may go."""
        return None

    def _quiesce(self) -> None:
        """After a failed send or receive: wait for copies still in flight, before their buffers are freed."""
        return None  # the byte-stream planes copy synchronously

    # ---- sending ------------------------------------------------------------------------------------
    async def send(self, header: KVHeader, layers: LayerSource) -> TransferStats:
        """Ship header then layers as they become ready; returns once the receiver acknowledged."""
        try:
            return await self._send(header, layers)
        except BaseException:
            self.broken = True
            self._quiesce()
            raise

    async def _batches(self, header: KVHeader, layers: LayerSource) -> AsyncIterator[_Batch]:
        if isinstance(layers, StagedKV):
            if layers.header != header:
                raise KVMismatchError(f"request {header.request_id}: staged KV is {layers.header}, lease says {header}")
            raw = self.codec.name == "none"
            want = self._plan(self.codec, header).wire_specs
            sent = 0
            while sent < header.num_layers:
                upto = await layers.wait_ready(sent + 1)
                layers.device_wait(upto)
                if raw:  # the staged bytes are the wire bytes
                    yield _Batch(sent, upto - sent, layers.wire(sent, upto), want, layers.event(upto))
                else:  # the ready layers encoded together, in the wire layout (each layer's parts padded)
                    yield _Batch(sent, upto - sent, pack_layers(self.codec.encode_many(*layers.layers(sent, upto))),
                                 want)
                sent = upto
            return
        count = 0
        async for k, v in layers:
            if count == header.num_layers:
                raise KVMismatchError(f"request {header.request_id}: the KV source has more than the header's "
                                      f"{header.num_layers} layers")
            parts = self.codec.encode(k, v)
            yield _Batch(count, 1, pack(parts), [PartSpec.of(p).to_wire() for p in parts])
            count += 1

    async def _send(self, header: KVHeader, layers: LayerSource) -> TransferStats:
        start = time.perf_counter()
        codec_info = {"name": self.codec.name, "blockTokens": getattr(self.codec, "block_tokens", None)}
        # Queued: it leaves with the first batch (one write, one receiver wake-up for a ready payload).
        self.stream.queue_json({"type": "begin", "header": header.model_dump(mode="json"), "codec": codec_info})
        plan = self._plan(self.codec, header)
        layer_bytes, total = plan.layer_bytes, header.num_layers * plan.layer_bytes
        try:
            count, batches = await self._send_batches(header, layers, layer_bytes, total)
        except KVStagingError as e:
            await self.send_error("internal", str(e))  # the receiver fails with the reason, not a bare EOF
            raise
        if count < header.num_layers:
            # Short of the header's layers: the receiver waits for more, so tell it why there are none.
            message = f"request {header.request_id}: the source ended after {count} of {header.num_layers} layers"
            reply = await self._recv_reply_or_say(message)
        else:
            reply = await self.stream.recv_json()
        if reply.get("type") != "ack":
            raise _remote_error(reply)
        self._pull_done()
        return TransferStats(header.request_id, self.kind, self.codec.name, count, header.num_layers * plan.wire_bytes,
                             header.nbytes, time.perf_counter() - start, batches)

    async def _send_batches(self, header: KVHeader, layers: LayerSource, layer_bytes: int,
                            total: int) -> tuple[int, int]:
        count = batches = 0
        async for batch in self._batches(header, layers):
            if batch.wire.numel() != batch.count * layer_bytes:
                # The source contradicts its header: declare what it has, and let the receiver's refusal end it.
                await self.stream.send_json({"type": "layers", "start": batch.start, "count": batch.count,
                                             "parts": batch.parts})
                break
            fields = await self._stage_out(batch.wire, batch.start * layer_bytes, total, batch.ready)
            # Queued, so that it leaves together with the batch's data frame (or alone, by the flush).
            self.stream.queue_json({"type": "layers", "start": batch.start, "count": batch.count,
                                    "parts": batch.parts, **fields})
            await self._ship(batch.wire, fields)
            await self.stream.flush()
            count += batch.count
            batches += 1
        return count, batches

    async def _recv_reply_or_say(self, message: str) -> dict:
        try:
            await self.send_error("mismatch", message)
            return await self.stream.recv_json()
        except KVChannelError:
            return {"type": "error", "code": "mismatch", "message": message}

    async def send_error(self, code: str, message: str) -> None:
        """Answer a request for KV with an error instead of a payload (the link stays usable)."""
        await self.stream.send_json({"type": "error", "code": code, "message": message})

    # ---- receiving ----------------------------------------------------------------------------------
    async def recv(
        self,
        *,
        expect: Callable[[KVHeader], None] | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[KVPayload, TransferStats]:
        """Receive one payload. `expect` raises KVMismatchError for a header this end cannot use.

        A KVNotFound or KVForbidden answer leaves the link usable; any other error marks it broken.
        """
        try:
            return await self._recv(expect, torch.device(device))
        except (KVNotFound, KVForbidden):
            self._quiesce()  # an answer instead of a payload; a confused peer may send it mid-payload
            raise
        except KVMismatchError as e:
            self.broken = True
            self._quiesce()
            await self._tell_sender(e)
            raise
        except BaseException:
            self.broken = True
            self._quiesce()
            raise

    async def _tell_sender(self, error: KVMismatchError) -> None:
        # Best effort: the sender, waiting for its ack, then fails with our reason instead of a bare EOF.
        try:
            await self.send_error("mismatch", str(error))
        except KVChannelError:
            pass

    async def _recv(self, expect: Callable[[KVHeader], None] | None,
                    device: torch.device) -> tuple[KVPayload, TransferStats]:
        begin = await self.stream.recv_json()
        start = time.perf_counter()
        if begin.get("type") == "error":
            raise _remote_error(begin)
        if begin.get("type") != "begin":
            raise KVChannelError(f"KV protocol error: expected 'begin', got {begin.get('type')!r}")
        try:
            header = KVHeader.model_validate(begin["header"])
            info = begin["codec"]
            codec = make_codec(info["name"], block_tokens=info.get("blockTokens") or 16)
        except (ValidationError, KeyError, ValueError) as e:
            raise KVMismatchError(f"unusable KV header from {self.stream.peer}: {e}") from e
        if expect is not None:
            expect(header)
        plan = self._plan(codec, header)
        specs, want, layer_bytes = plan.specs, plan.wire_specs, plan.layer_bytes
        landing = self._landing(header.num_layers * layer_bytes, device)
        got = batches = 0
        while got < header.num_layers:
            msg = await self.stream.recv_json()
            if msg.get("type") == "error":
                raise _remote_error(msg)
            n = msg.get("count")
            if msg.get("type") != "layers" or msg.get("start") != got or not isinstance(n, int) \
                    or not 1 <= n <= header.num_layers - got:
                raise KVMismatchError(
                    f"request {header.request_id}: expected layers from {got} of {header.num_layers}, got "
                    f"{msg.get('type')!r} from #{msg.get('start')} x {n}"
                )
            if msg.get("parts") != want:
                raise KVMismatchError(
                    f"request {header.request_id}: layer {got} parts {msg.get('parts')} do not match the header "
                    f"({want})"
                )
            offset = got * layer_bytes
            await self._land(landing[offset:offset + n * layer_bytes], offset, msg)
            got += n
            batches += 1
        await self._settle(device)
        placed = landing if landing.device == device else landing.to(device)
        keys, values = _layers_of(placed, header, codec, specs)
        payload = KVPayload(header, keys, values)
        if codec.name != "none":
            payload.check()  # decoded tensors; raw ones are views of the header's grid, right by construction
        # Posted, not awaited: the payload is placed, so the caller goes on (it leaves on the loop's next turn,
        # or with this link's next message, whichever is first).
        self.stream.post_json({"type": "ack"})
        return payload, TransferStats(header.request_id, self.kind, codec.name, header.num_layers,
                                      header.num_layers * plan.wire_bytes, header.nbytes,
                                      time.perf_counter() - start, batches)

    async def close(self) -> None:
        await self.stream.close()
