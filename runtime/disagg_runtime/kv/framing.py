"""Length-prefixed frames over an asyncio stream: JSON control messages and raw tensor bytes.

Every frame read has a timeout. It is one `asyncio.timeout` scope per frame (head and body together), not
`asyncio.wait_for`: wait_for wraps each read in a new task, and at a few control frames per pull those
tasks and timer handles were a measurable share of a pull's fixed cost.

A sender can queue control messages (`queue_json`) so that they leave with the next frame in one
transport write: a pull's header, its layers message and (for a small payload) its bytes then cost the
receiver one wake-up and the kernel one send, not three of each.
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
# Data frames up to this size are joined with the queued control frames into one write (a copy this small
# costs less than the extra send and receiver wake-up it saves).
_COALESCE = 1 << 20


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
        self._pending: list[bytes] = []  # queued control frames, written with the next frame or flush()

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
        self._check_kind(kind, want, what)
        return length

    def _check_kind(self, kind: int, want: int, what: str) -> None:
        if kind != want:
            # 0x44 is the first byte of the token challenge (kv/auth.py) of a server that requires a token.
            hint = "; the KV server requires the internal token (--internal-token-file)" if kind == 0x44 else ""
            raise KVChannelError(f"KV protocol error from {self.peer}: expected {what}, got frame kind {kind}{hint}")

    @staticmethod
    def _json_frame(message: dict) -> bytes:
        data = json.dumps(message, separators=(",", ":")).encode()
        return _HEAD.pack(_JSON, len(data)) + data

    def queue_json(self, message: dict) -> None:
        """Queue a control message; it is written with the next frame sent (or by `flush`)."""
        self._pending.append(self._json_frame(message))

    async def flush(self) -> None:
        """Write the queued control messages now."""
        if self._pending:
            self._write_pending(b"")
            await self._drain()

    def _write_pending(self, tail: bytes | memoryview) -> None:
        parts, self._pending = self._pending, []
        parts.append(tail)
        self.writer.write(b"".join(parts))

    async def send_json(self, message: dict) -> None:
        self._write_pending(self._json_frame(message))
        await self._drain()

    async def recv_json(self, *, wait_forever: bool = False) -> dict:
        """Next control message; `wait_forever` for an idle link that waits for its next request."""
        if wait_forever:
            length = await self._read_head(_JSON, "a control message", wait_forever=True)
            return json.loads(await self._read_exactly(self._json_length(length), "a control message"))
        try:
            return json.loads(await _bounded(self._json_body(), self.timeout))  # one timer for head and body
        except asyncio.TimeoutError as e:
            raise KVTimeout(f"no control message from {self.peer} within {self.timeout:.1f}s") from e
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise KVPeerClosed(f"KV peer {self.peer} closed the connection while sending a control message") from e

    async def _json_body(self) -> bytes:
        length = self._json_length(await self._head(_JSON, "a control message"))
        return await self.reader.readexactly(length)

    def _json_length(self, length: int) -> int:
        if length > MAX_JSON_BYTES:
            raise KVChannelError(f"KV control message of {length} bytes from {self.peer} exceeds {MAX_JSON_BYTES}")
        return length

    async def _head(self, want: int, what: str) -> int:
        """A frame head, read inside the caller's timeout scope."""
        kind, length = _HEAD.unpack(await self.reader.readexactly(_HEAD.size))
        self._check_kind(kind, want, what)
        return length

    async def send_bytes(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if len(view) <= _COALESCE:
            self._pending.append(_HEAD.pack(_BYTES, len(view)))
            self._write_pending(view)
            await self._drain()
            return
        self._write_pending(_HEAD.pack(_BYTES, len(view)))
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
        length, off = await self._tensor_start(dst)
        while off < length:
            off += await self._tensor_chunk(dst, off, length)

    async def _tensor_start(self, dst: memoryview) -> tuple[int, int]:
        """The data frame's head and its first bytes under one timer (a small payload: all of it)."""
        async def start() -> tuple[int, int]:
            length = await self._head(_BYTES, "a tensor")
            if length != len(dst):
                raise KVChannelError(f"KV data frame from {self.peer} is {length} bytes, expected {len(dst)}")
            return length, await self._tensor_chunk(dst, 0, length, bounded=False) if length else 0

        try:
            return await _bounded(start(), self.timeout)
        except asyncio.TimeoutError as e:
            raise KVTimeout(f"no tensor bytes from {self.peer} within {self.timeout:.1f}s") from e
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise KVPeerClosed(f"KV peer {self.peer} dropped the connection before a tensor") from e

    async def _tensor_chunk(self, dst: memoryview, off: int, length: int, *, bounded: bool = True) -> int:
        read = self.reader.read(min(length - off, _CHUNK))
        try:
            chunk = await (_bounded(read, self.timeout) if bounded else read)
        except asyncio.TimeoutError as e:
            raise KVTimeout(f"tensor bytes from {self.peer} stalled for {self.timeout:.1f}s") from e
        except ConnectionError as e:
            raise KVPeerClosed(f"KV peer {self.peer} dropped the connection mid-tensor") from e
        if not chunk:
            raise KVPeerClosed(f"KV peer {self.peer} closed the connection mid-tensor ({off}/{length} bytes)")
        dst[off:off + len(chunk)] = chunk
        return len(chunk)

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

    def post_json(self, message: dict) -> None:
        """Send a small control message without waiting for it: queued, and written on the event loop's
        next turn unless another frame takes it along first. The caller goes on at once; on a busy
        machine the write itself can cost a context switch to the peer it wakes."""
        self.queue_json(message)
        asyncio.get_running_loop().call_soon(self._write_posted)

    def _write_posted(self) -> None:
        if self._pending and not self.writer.transport.is_closing():
            self._write_pending(b"")  # small: no drain needed; a dead peer shows on the link's next read

    async def close(self) -> None:
        self._write_posted()  # a posted message (a pull's ack) still goes out before the close
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # already gone: nothing left to flush
