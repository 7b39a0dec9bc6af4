"""Decode end: pulls a request's KV from the prefill instance that holds it (the paper's pull model)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .channel import KVChannel, TransferStats
from .codec import CodecName
from .errors import KVChannelError, KVNotFound
from .framing import FramedStream
from .links import ChannelChoice, Endpoint, open_link
from .payload import KVHeader, KVPayload
from .reshard import KVSlice


@dataclass(frozen=True)
class KVAddress:
    """Where a prefill instance serves KV."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class _Link:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    channel: KVChannel | None = None


class KVPuller:
    """Keeps one link per prefill instance; pulls on a link are serialised (a link is one byte pipe)."""

    def __init__(self, *, local: Endpoint, device: torch.device | str = "cpu", channel: ChannelChoice = "auto",
                 codec: CodecName = "none", timeout: float = 30.0,
                 on_transfer: Callable[[TransferStats], None] | None = None) -> None:
        self.local = local
        self.device = torch.device(device)
        self.channel = channel
        self.codec = codec
        self.timeout = timeout
        self.on_transfer = on_transfer
        self._links: dict[KVAddress, _Link] = {}

    async def _channel(self, address: KVAddress, link: _Link) -> KVChannel:
        if link.channel is None or link.channel.broken:
            if link.channel is not None:
                await link.channel.close()
            stream = await FramedStream.connect(address.host, address.port, timeout=self.timeout)
            try:
                link.channel = await open_link(stream, local=self.local, device=self.device,
                                               override=self.channel, codec=self.codec)
            except BaseException:
                await stream.close()
                raise
        return link.channel

    async def pull(self, address: KVAddress, request_id: str,
                   expect: Callable[[KVHeader], None] | None = None, kv_slice: KVSlice | None = None) -> KVPayload:
        """Fetch `request_id`'s KV (or only `kv_slice` of it) from `address`.

        Raises KVNotFound, KVMismatchError, KVTimeout, KVChannelError.
        """
        link = self._links.setdefault(address, _Link())
        async with link.lock:
            channel = await self._channel(address, link)
            msg: dict = {"type": "pull", "requestId": request_id}
            if kv_slice is not None:
                msg["slice"] = kv_slice.model_dump()
            try:
                await channel.stream.send_json(msg)
                payload, stats = await channel.recv(expect=expect, device=self.device)
            except KVNotFound:
                raise
            except BaseException:
                channel.broken = True
                raise
        if self.on_transfer is not None:
            self.on_transfer(stats)
        return payload

    async def release(self, address: KVAddress, request_id: str) -> None:
        """Tell the prefill instance at `address` that every piece of `request_id`'s KV arrived (it frees it)."""
        link = self._links.setdefault(address, _Link())
        async with link.lock:
            channel = await self._channel(address, link)
            try:
                await channel.stream.send_json({"type": "release", "requestId": request_id})
                reply = await channel.stream.recv_json()
            except BaseException:
                channel.broken = True
                raise
        if reply.get("type") != "released":
            raise KVChannelError(f"KV server {address} answered {reply.get('type')!r} to a release of {request_id}")

    async def close(self) -> None:
        for link in self._links.values():
            if link.channel is not None:
                await link.channel.close()
        self._links.clear()


__all__ = ["KVAddress", "KVChannelError", "KVPuller"]
