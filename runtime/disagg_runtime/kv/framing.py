"""Length-prefixed frames over an asyncio stream: JSON control messages and raw tensor bytes.

Every read has a timeout. It is an `asyncio.timeout` scope, not `asyncio.wait_for`: wait_for wraps each
read in a new task, and at a few control frames per pull those tasks were a measurable share of a
pull's fixed cost.
"""

from __future__ import annotations

import asyncio
import json
import struct

import torch

from .errors import KVChannelError, KVPeerClosed, KVTimeout

_HEAD = struct.Struct(">BQ")  # frame kind, payload length
_JSON, _BYTES = 1, 2
# Control messages are small; a bigger one means a confused or hostile peer.
MAX_JSON_BYTES = 16 << 20
# Bytes handed to the transport per write, so the writer's buffer (and our memory) stays bounded.
_CHUNK = 4 << 20
# StreamReader buffer limit for KV links: reads of tensor bytes return up to this much at once (the
# default 64 KiB made a 32 MiB layer batch hundreds of reads).
STREAM_LIMIT = _CHUNK
# Below this many unsent bytes a drain would return at once: skip it (asyncio's default high-water mark).
_LOW_WATER = 64 << 10


async def _bounded(coro, seconds: float | None):
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)


class FramedStream:
    """Both directions of one TCP connection, read with a timeout on every frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float) -> FramedStream:
        try:
            reader, writer = await _bounded(asyncio.open_connection(host, port, limit=STREAM_LIMIT), timeout)
        except asyncio.TimeoutError as e:
            raise KVTimeout(f"connecting to KV server {host}:{port} took over {timeout:.1f}s") from e
        except OSError as e:
            raise KVChannelError(f"cannot reach KV server {host}:{port}: {e}") from e
        return cls(reader, writer, timeout=timeout)

    @property
    def peer(self) -> str:
        info = self.writer.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if info else "?"

    async def _read_exactly(self, n: int, what: str, *, wait_forever: bool = False) -> bytes:
        try:
            return await _bounded(self.reader.readexactly(n), None if wait_forever else self.timeout)
        except asyncio.TimeoutError as e:
            raise KVTimeout(f"no {what} from {self.peer} within {self.timeout:.1f}s") from e
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise KVPeerClosed(f"KV peer {self.peer} closed the connection while sending {what}") from e

    async def _read_head(self, want: int, what: str, *, wait_forever: bool = False) -> int:
        kind, length = _HEAD.unpack(await self._read_exactly(_HEAD.size, what, wait_forever=wait_forever))
        if kind != want:
            # 0x44 is the first byte of the token challenge (kv/auth.py) of a server that requires a token.
            hint = "; the KV server requires the internal token (--internal-token-file)" if kind == 0x44 else ""
            raise KVChannelError(f"KV protocol error from {self.peer}: expected {what}, got frame kind {kind}{hint}")
        return length

    async def send_json(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        self.writer.write(_HEAD.pack(_JSON, len(data)) + data)
        await self._drain()

    async def recv_json(self, *, wait_forever: bool = False) -> dict:
        """Next control message; `wait_forever` for an idle link that waits for its next request."""
        length = await self._read_head(_JSON, "a control message", wait_forever=wait_forever)
        if length > MAX_JSON_BYTES:
            raise KVChannelError(f"KV control message of {length} bytes from {self.peer} exceeds {MAX_JSON_BYTES}")
        return json.loads(await self._read_exactly(length, "a control message"))

    async def send_bytes(self, data: bytes | memoryview) -> None:
        self.writer.write(_HEAD.pack(_BYTES, len(data)))
        view = memoryview(data).cast("B")
        for off in range(0, len(view), _CHUNK):
            self.writer.write(view[off:off + _CHUNK])
            await self._drain()
        await self._drain()

    async def recv_bytes(self) -> bytes:
        length = await self._read_head(_BYTES, "a data frame")
        return await self._read_exactly(length, "a data frame")

    async def send_tensor(self, t: torch.Tensor) -> None:
        """Ship a tensor's bytes (moved to host memory first if it lives on a GPU)."""
        flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        await self.send_bytes(memoryview(flat.numpy()))

    async def recv_tensor_into(self, out: torch.Tensor) -> None:
        """Fill a contiguous CPU tensor with the next data frame, which must have exactly its size."""
        dst = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        length = await self._read_head(_BYTES, "a tensor")
        if length != len(dst):
            raise KVChannelError(f"KV data frame from {self.peer} is {length} bytes, expected {len(dst)}")
        off = 0
        while off < length:
            try:
                chunk = await _bounded(self.reader.read(min(length - off, _CHUNK)), self.timeout)
            except asyncio.TimeoutError as e:
                raise KVTimeout(f"tensor bytes from {self.peer} stalled for {self.timeout:.1f}s") from e
            except ConnectionError as e:
                raise KVPeerClosed(f"KV peer {self.peer} dropped the connection mid-tensor") from e
            if not chunk:
                raise KVPeerClosed(f"KV peer {self.peer} closed the connection mid-tensor ({off}/{length} bytes)")
            dst[off:off + len(chunk)] = chunk
            off += len(chunk)

    async def _drain(self) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            raise KVPeerClosed(f"KV peer {self.peer} closed the connection")
        if transport.get_write_buffer_size() < _LOW_WATER:
            return  # the transport is not paused: drain() would return at once
        try:
            await _bounded(self.writer.drain(), self.timeout)
        except asyncio.TimeoutError as e:
            raise KVTimeout(f"KV peer {self.peer} did not read for {self.timeout:.1f}s") from e
        except ConnectionError as e:
            raise KVPeerClosed(f"KV peer {self.peer} closed the connection: {e}") from e

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # already gone: nothing left to flush
