"""Decode end: pulls a request's KV from the prefill instance that holds it (the paper's pull model)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from ..security.tokens import InternalToken
from .auth import prove_to_server
from .channel import KVChannel, TransferStats, _layers_of, _remote_error
from .codec import CodecName, make_codec
from .errors import (
    DirectReadUnavailable,
    KVChannelError,
    KVForbidden,
    KVMismatchError,
    KVNotFound,
    KVPeerClosed,
)
from .framing import FramedStream
from .links import ChannelChoice, Endpoint, open_link
from .payload import KVHeader, KVPayload
from .reshard import KVSlice
from .staged import staged_nbytes

log = logging.getLogger(__name__)
T = TypeVar("T")
_RAW = make_codec("none")  # a direct read moves the staged bytes as they are


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
    """Keeps one link per prefill instance; pulls on a link are serialised (a link is one byte pipe).

    With `token`, every new link first proves the internal token and checks the server's proof (kv/auth.py).
    """

    def __init__(self, *, local: Endpoint, device: torch.device | str = "cpu", channel: ChannelChoice = "auto",
                 codec: CodecName = "none", timeout: float = 30.0,
                 on_transfer: Callable[[TransferStats], None] | None = None,
                 token: InternalToken | None = None) -> None:
        self.local = local
        self.device = torch.device(device)
        self.channel = channel
        self.codec = codec
        self.timeout = timeout
        self.on_transfer = on_transfer
        self.token = token
        self._links: dict[KVAddress, _Link] = {}

    async def _channel(self, address: KVAddress, link: _Link) -> KVChannel:
        if link.channel is None or link.channel.broken:
            if link.channel is not None:
                await link.channel.close()
            stream = await FramedStream.connect(address.host, address.port, timeout=self.timeout)
            try:
                if self.token is not None:
                    await prove_to_server(stream, self.token)
                link.channel = await open_link(stream, local=self.local, device=self.device,
                                               override=self.channel, codec=self.codec)
            except BaseException:
                await stream.close()
                raise
        return link.channel

    async def pull(self, address: KVAddress, request_id: str,
                   expect: Callable[[KVHeader], None] | None = None, kv_slice: KVSlice | None = None, *,
                   ticket: str | None = None) -> KVPayload:
        """Fetch `request_id`'s KV (or only `kv_slice` of it) from `address`, presenting the `ticket` its
        prefill worker issued.

        Raises KVNotFound, KVForbidden, KVMismatchError, KVTimeout, KVChannelError; a payload made for
        another request id is a KVMismatchError.
        """

        def check(header: KVHeader) -> None:
            if header.request_id != request_id:
                raise KVMismatchError(f"pulled {request_id} but the KV server sent {header.request_id}")
            if expect is not None:
                expect(header)

        link = self._links.setdefault(address, _Link())
        msg: dict = {"type": "pull", "requestId": request_id, "ticket": ticket}
        if kv_slice is not None:
            msg["slice"] = kv_slice.model_dump()
        async with link.lock:
            start = time.perf_counter()
            payload, stats = await self._once_more_if_stale(address, link,
                                                            lambda: self._pull_on(address, link, msg, check))
            stats = replace(stats, seconds=time.perf_counter() - start)  # the whole pull, as the caller waits
        if self.on_transfer is not None:
            self.on_transfer(stats)
        return payload

    @staticmethod
    async def _once_more_if_stale(address: KVAddress, link: _Link, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, run again on a fresh link if it failed because a link kept from earlier pulls was
        closed by its peer since (restarted, or dropped the idle connection): nothing of it was used."""
        reused = link.channel is not None and not link.channel.broken
        try:
            return await attempt()
        except KVPeerClosed as e:
            if not reused:
                raise
            log.info("KV link to %s was closed by the peer (%s); reconnecting", address, e)
            return await attempt()

    async def _pull_on(self, address: KVAddress, link: _Link, msg: dict,
                       check: Callable[[KVHeader], None]) -> tuple[KVPayload, TransferStats]:
        channel = await self._channel(address, link)
        try:
            await channel.stream.send_json(msg)
            return await channel.recv(expect=check, device=self.device)
        except (KVNotFound, KVForbidden):
            raise
        except BaseException:
            channel.broken = True
            raise

    async def read_direct(self, address: KVAddress, header: KVHeader, arena: str, offset: int,
                          expect: Callable[[KVHeader], None] | None = None) -> tuple[KVPayload, TransferStats]:
        """Copy a request's staged KV straight out of the prefill's staging arena (kv/arena.py), which the
        link maps the first time it sees the arena: no message to the prefill worker after that.

        `header` and the arena location come from the prefill worker's answer (the router passes them on).
        The caller must `release` the KV afterwards: only a successful release proves that the bytes were
        still this request's while they were copied (a prefill worker frees unpulled KV after its TTL).
        Raises KVMismatchError (from `expect`) for a header this end cannot use, DirectReadUnavailable when
        the read cannot be made (not an ipc link, the arena is gone, a location outside it: the caller pulls
        instead); does not report to `on_transfer`.
        """
        if expect is not None:
            expect(header)
        link = self._links.setdefault(address, _Link())
        async with link.lock:
            start = time.perf_counter()
            placed = await self._once_more_if_stale(address, link,
                                                    lambda: self._read_on(address, link, header, arena, offset))
            seconds = time.perf_counter() - start
        keys, values = _layers_of(placed, header, _RAW, _RAW.part_specs(header))
        stats = TransferStats(header.request_id, "ipc", "none", header.num_layers, placed.numel(), header.nbytes,
                              seconds, batches=1, direct=True)
        return KVPayload(header, keys, values), stats

    async def _read_on(self, address: KVAddress, link: _Link, header: KVHeader, arena: str,
                       offset: int) -> torch.Tensor:
        channel = await self._channel(address, link)
        read = getattr(channel, "read_direct", None)
        if read is None:
            raise DirectReadUnavailable(f"the KV link to {address} is {channel.kind}; direct reads need ipc")
        try:
            return await read(arena, offset, staged_nbytes(header), self.device)
        except (KVNotFound, KVMismatchError) as e:
            # Refused, or a location this end cannot use; the link is fine, and a pull is always possible.
            raise DirectReadUnavailable(str(e)) from e
        except BaseException:
            channel.broken = True
            raise

    async def release(self, address: KVAddress, request_id: str, *, ticket: str | None = None) -> None:
        """Tell the prefill instance at `address` that every piece of `request_id`'s KV arrived (it frees it)."""
        link = self._links.setdefault(address, _Link())
        async with link.lock:
            channel = await self._channel(address, link)
            try:
                await channel.stream.send_json({"type": "release", "requestId": request_id, "ticket": ticket})
                reply = await channel.stream.recv_json()
            except BaseException:
                channel.broken = True
                raise
        if reply.get("type") == "error":
            raise _remote_error(reply)
        if reply.get("type") != "released":
            raise KVChannelError(f"KV server {address} answered {reply.get('type')!r} to a release of {request_id}")

    async def close(self) -> None:
        for link in self._links.values():
            if link.channel is not None:
                await link.channel.close()
        self._links.clear()


__all__ = ["KVAddress", "KVChannelError", "KVPuller"]
