"""Prefill end: a KV server that hands each parked request's KV to the decode end that pulls it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import ValidationError

from ..security.tokens import InternalToken
from .auth import verify_client
from .channel import KVChannel, LayerSource, TransferStats
from .errors import KVChannelError, KVForbidden, KVMismatchError, KVNotFound
from .framing import STREAM_LIMIT, FramedStream
from .links import Endpoint, accept_link
from .payload import KVHeader
from .reshard import KVSlice

log = logging.getLogger(__name__)
# What a refused pull or release answers, first match (the peer's channel.py maps the codes back).
_ERROR_CODES: tuple[tuple[type[Exception], str], ...] = (
    (KVForbidden, "forbidden"), (KVNotFound, "not_found"), (KVMismatchError, "mismatch"), (KVChannelError, "internal"))


@dataclass
class KVLease:
    """One request's KV checked out for sending; `release(True)` after the receiver acked frees it."""

    header: KVHeader
    layers: LayerSource  # a staged payload (kv/staged.py) or a layer stream
    release: Callable[[bool], Awaitable[None]]


class KVSource(Protocol):
    """What the KV server sends from (the prefill worker's parked requests, or one rank's share of them)."""

    async def checkout(self, request_id: str, ticket: str | None) -> KVLease:
        """The request's KV, waiting (bounded) while its prefill runs; KVNotFound if there is none,
        KVForbidden if `ticket` is not the one issued with this request's KV."""
        ...

    async def checkout_slice(self, request_id: str, kv_slice: KVSlice, ticket: str | None) -> KVLease:
        """Only `kv_slice` (global layers and KV heads) of the request's KV; its lease frees nothing."""
        ...

    async def release_pulled(self, request_id: str, ticket: str | None) -> None:
        """Every slice of the request reached its decode ranks: free its KV (KVNotFound if unknown here)."""
        ...


class KVServer:
    """Accepts links from decode ends and answers their pulls, one at a time per link.

    With `token`, a connection that does not prove it holds the internal token is closed before its
    first control message is read (kv/auth.py). A source that also has `arena(arena_id) -> tensor | None`
    (kv/arena.py; the prefill worker) lets decode ends on ipc links map its staging arenas for direct reads.
    """

    def __init__(self, source: KVSource, *, local: Endpoint, device: torch.device | str = "cpu",
                 host: str = "0.0.0.0", port: int = 0, timeout: float = 30.0,
                 on_transfer: Callable[[TransferStats], None] | None = None,
                 token: InternalToken | None = None) -> None:
        self.source = source
        self.local = local
        self.device = torch.device(device)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.on_transfer = on_transfer
        self.token = token
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task] = set()
        self._busy: set[asyncio.Task] = set()  # links in the middle of a pull or a release
        self._closing = False

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._links.add(task)
        stream = FramedStream(reader, writer, timeout=self.timeout)
        channel: KVChannel | None = None
        try:
            if self.token is not None:
                await verify_client(stream, self.token)
            channel = await accept_link(stream, local=self.local, device=self.device)
            await self._serve(channel)
        except KVChannelError as e:
            log.warning("KV link from %s ended: %s", stream.peer, e)
        except asyncio.CancelledError:
            # Only close() cancels links; asyncio's start_server callback would log a cancelled task as
            # an error, so the link ends quietly here instead.
            pass
        except Exception:
            log.exception("KV link from %s failed", stream.peer)
        finally:
            self._links.discard(task)
            if channel is not None:
                await channel.close()
            else:
                await stream.close()

    async def _serve(self, channel: KVChannel) -> None:
        while True:
            try:
                msg = await channel.stream.recv_json(wait_forever=True)
            except KVChannelError:
                return  # the decode end closed its link
            task = asyncio.current_task()
            self._busy.add(task)
            try:
                await self._answer(channel, msg)
            finally:
                self._busy.discard(task)
            if self._closing:
                return

    async def _answer(self, channel: KVChannel, msg: dict) -> None:
        if msg.get("type") == "map":
            await self._map(channel, msg.get("arena"))
            return
        ticket = msg.get("ticket")
        if (msg.get("type") not in ("pull", "release") or not isinstance(msg.get("requestId"), str)
                or not isinstance(ticket, str | None)):
            raise KVChannelError(f"expected a pull, a release or a map, got {msg!r}")
        if msg["type"] == "release":
            await self._release(channel, msg["requestId"], ticket)
            return
        try:
            if msg.get("slice") is None:
                lease = await self.source.checkout(msg["requestId"], ticket)
            else:
                lease = await self.source.checkout_slice(msg["requestId"], _slice(msg["slice"]), ticket)
        except (KVForbidden, KVNotFound, KVMismatchError, KVChannelError) as e:
            await self._refuse(channel, "pull", e)
            return
        ok = False
        try:
            stats = await channel.send(lease.header, lease.layers)
            ok = True
        finally:
            await lease.release(ok)
        if self.on_transfer is not None:
            self.on_transfer(stats)

    async def _release(self, channel: KVChannel, request_id: str, ticket: str | None) -> None:
        try:
            await self.source.release_pulled(request_id, ticket)
        except (KVForbidden, KVNotFound) as e:
            await self._refuse(channel, "release", e)
            return
        await channel.stream.send_json({"type": "released"})

    async def _map(self, channel: KVChannel, arena_id: object) -> None:
        """Share a staging arena with a decode end on this node, so that it reads staged KV directly."""
        if not isinstance(arena_id, str):
            raise KVChannelError(f"a map names an arena id, got {arena_id!r}")
        share = getattr(channel, "share_arena", None)
        if share is None:
            await channel.send_error("mismatch", f"direct reads need an ipc KV link; this one is {channel.kind}")
            return
        lookup = getattr(self.source, "arena", None)
        buffer = lookup(arena_id) if lookup is not None else None
        if buffer is None:
            await channel.send_error("not_found", f"no staging arena {arena_id} here (the prefill worker "
                                     "restarted, or the arena was let go)")
            return
        await share(arena_id, buffer)

    @staticmethod
    async def _refuse(channel: KVChannel, what: str, error: Exception) -> None:
        """Answer a pull or release the source refused with the error code its peer maps back to the error."""
        code = next(c for kind, c in _ERROR_CODES if isinstance(error, kind))
        if code == "forbidden":
            log.warning("refused a %s from %s: %s", what, channel.stream.peer, error)
        await channel.send_error(code, str(error))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # A link mid-pull finishes it (its receiver has the bytes and is acking); idle links just end.
        self._closing = True
        for task in list(self._links):
            if task not in self._busy:
                task.cancel()
        busy = list(self._busy)
        if busy:
            await asyncio.wait(busy, timeout=self.timeout)
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)


def _slice(data: object) -> KVSlice:
    try:
        return KVSlice.model_validate(data)
    except ValidationError as e:
        raise KVMismatchError(f"malformed KV slice {data!r}: {e.errors()[0]['msg']}") from e
