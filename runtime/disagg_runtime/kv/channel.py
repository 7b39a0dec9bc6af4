"""The KVChannel interface: one established prefill -> decode link that ships KV payloads layer by layer.

Every channel shares the control protocol on a framed TCP stream (begin, one `layer` message per layer,
end, ack); only the data plane differs (the same TCP stream, a torch.distributed group, or CUDA IPC
handles). Layers go out as the sender's iterator yields them, so a producer that finishes layer i
before layer i+1 overlaps its compute with the transfer. The receiver checks the header against what
it expects and every layer's declared parts against the header before reading any tensor bytes.
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
from .payload import KVHeader, KVPayload

ChannelKind = Literal["tcp", "ipc", "nccl"]
LayerStream = AsyncIterable[tuple[torch.Tensor, torch.Tensor]]


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


async def payload_layers(payload: KVPayload) -> AsyncIterator[tuple[torch.Tensor, torch.Tensor]]:
    """A finished payload as a layer stream."""
    for k, v in zip(payload.keys, payload.values, strict=True):
        yield k, v


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
    # A bulk data plane ships every layer's parts in one `_send_parts` call after the last layer is
    # encoded. For CUDA IPC the per-call cost (pickling, mapping a handle, a stream sync) dwarfs the copy
    # itself, so one call per payload beats one per layer; streaming planes (tcp, nccl) keep overlap.
    bulk: ClassVar[bool] = False

    def __init__(self, stream: FramedStream, *, codec: LayerCodec) -> None:
        self.stream = stream
        self.codec = codec
        self.broken = False

    @abstractmethod
    async def _send_parts(self, parts: list[torch.Tensor]) -> None:
        """Ship one layer's encoded tensors over the data plane."""

    @abstractmethod
    async def _recv_parts(self, specs: list[PartSpec], device: torch.device) -> list[torch.Tensor]:
        """Receive one layer's encoded tensors, already checked against `specs`, onto `device`."""

    def _encode_device(self, device: torch.device) -> torch.device:
        """Where the receiver should place wire tensors before decoding them (the data plane's choice)."""
        return device

    async def send(self, header: KVHeader, layers: LayerStream) -> TransferStats:
        """Ship header then layers as they are yielded; returns once the receiver acknowledged."""
        try:
            return await self._send(header, layers)
        except BaseException:
            self.broken = True
            raise

    async def _send(self, header: KVHeader, layers: LayerStream) -> TransferStats:
        start = time.perf_counter()
        codec_info = {"name": self.codec.name, "blockTokens": getattr(self.codec, "block_tokens", None)}
        await self.stream.send_json({"type": "begin", "header": header.model_dump(mode="json"), "codec": codec_info})
        wire = count = 0
        held: list[torch.Tensor] = []
        async for k, v in layers:
            parts = self.codec.encode(k, v)
            await self.stream.send_json(
                {"type": "layer", "index": count, "parts": [PartSpec.of(p).to_wire() for p in parts]}
            )
            if self.bulk:
                held.extend(parts)
            else:
                await self._send_parts(parts)
            wire += sum(PartSpec.of(p).nbytes for p in parts)
            count += 1
        if self.bulk:
            await self._send_parts(held)
        await self.stream.send_json({"type": "end", "layers": count})
        reply = await self.stream.recv_json()
        if reply.get("type") != "ack":
            raise _remote_error(reply)
        return TransferStats(header.request_id, self.kind, self.codec.name, count, wire, header.nbytes,
                             time.perf_counter() - start)

    async def send_error(self, code: str, message: str) -> None:
        """Answer a request for KV with an error instead of a payload (the link stays usable)."""
        await self.stream.send_json({"type": "error", "code": code, "message": message})

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
            raise
        except KVMismatchError as e:
            self.broken = True
            await self._tell_sender(e)
            raise
        except BaseException:
            self.broken = True
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
        specs = codec.part_specs(header)
        want = [s.to_wire() for s in specs]
        received: list[list[torch.Tensor]] = []
        wire = 0
        for i in range(header.num_layers):
            msg = await self.stream.recv_json()
            if msg.get("type") != "layer" or msg.get("index") != i:
                raise KVMismatchError(
                    f"request {header.request_id}: expected layer {i} of {header.num_layers}, got "
                    f"{msg.get('type')!r} #{msg.get('index')}"
                )
            if msg.get("parts") != want:
                raise KVMismatchError(
                    f"request {header.request_id}: layer {i} parts {msg.get('parts')} do not match the header "
                    f"({want})"
                )
            if not self.bulk:
                received.append(await self._recv_parts(specs, self._encode_device(device)))
            wire += sum(s.nbytes for s in specs)
        if self.bulk:
            flat = await self._recv_parts(specs * header.num_layers, self._encode_device(device))
            received = [flat[i : i + len(specs)] for i in range(0, len(flat), len(specs))]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for parts in received:
            k, v = codec.decode(parts, header)
            keys.append(k.to(device))
            values.append(v.to(device))
        end = await self.stream.recv_json()
        if end.get("type") != "end":
            raise KVMismatchError(
                f"request {header.request_id}: sender went on after the header's {header.num_layers} layers"
            )
        payload = KVPayload(header, keys, values)
        payload.check()
        await self.stream.send_json({"type": "ack"})
        return payload, TransferStats(header.request_id, self.kind, codec.name, header.num_layers, wire,
                                      header.nbytes, time.perf_counter() - start)

    async def close(self) -> None:
        await self.stream.close()
