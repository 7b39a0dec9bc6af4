"""CUDA IPC data plane (prefill and decode on one node): a staging buffer mapped once per link, not bytes.

Each link's sender keeps one staging buffer (grown by powers of two, so a link settles on one) and one
interprocess CUDA event. The receiver maps both the first time they are used (or after the buffer
grew): opening an IPC memory handle costs milliseconds, which per pull was most of a transfer. After
that a batch of layers is one device-to-device copy into the staging buffer, an event record, a small
control message, and on the receiver a stream wait on that event plus one copy out (NVLink/PCIe).
The receiver synchronises its copy before the ack, and pulls on a link are serialised, so the sender
never overwrites bytes a receiver still reads. Both ends copy on a stream of their own: on the default
stream a copy would queue behind every prefill or decode kernel the engine thread enqueued meanwhile
(milliseconds), and the receiver's sync would wait for them too.

No tensor is handed to the caching allocator with `record_stream`: a block freed with a recorded stream
makes the allocator record an event on it, and when that free happens at interpreter exit (after the CUDA
driver unloaded) the event record throws in a destructor and aborts the process. Instead each end keeps
the tensors a copy still reads or writes until it knows the copy is done: the sender until the ack (the
receiver acks after syncing a copy that waited on the sender's event), the receiver until its sync; a
failed pull, and `close`, synchronise the link's stream before letting them go.

A direct read (kv/puller.py) skips the staging buffer and the round trip: the receiver maps the
prefill engine's staging arena once (`map_arena`, answered by `share_arena`) and copies a request's
bytes out of it at the offset the prefill worker published with its first token.

Landing buffers are allocated on the link's copy stream, so the caching allocator only ever hands them
memory last used by that stream: memory freed by the engine's stream may still be read or written by
kernels queued there, and the copy stream does not wait for those.

Only the mapping message is pickled (torch.multiprocessing's reductions turn the CUDA tensor into an IPC
handle); it is read only on a link whose peer proved the internal token (kv/auth.py), like every frame.
"""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as torch_mp

from .channel import KVChannel, _remote_error
from .errors import KVChannelError, KVMismatchError

_MIN_STAGING = 1 << 20
# Arenas a receiver keeps mapped per link (a prefill worker rarely has more than two live).
_MAX_MAPPED_ARENAS = 4


def _shareable(t: torch.Tensor) -> bool:
    # CPU tensors only travel by name under the file_system strategy; the default (file descriptors)
    # needs a unix socket between related processes, which a TCP control link is not.
    return t.is_cuda or torch_mp.get_sharing_strategy() == "file_system"


class CudaIpcKVChannel(KVChannel):
    """Layers through the link's shared staging buffer; the receiver copies, then acks."""

    kind = "ipc"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._staging: torch.Tensor | None = None  # sender: this link's staging buffer
        self._event: torch.cuda.Event | None = None  # sender: recorded after each copy into staging
        self._mapped: torch.Tensor | None = None  # receiver: the peer's staging buffer, kept mapped
        self._peer_event: torch.cuda.Event | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        self._in_flight: list[torch.Tensor] = []  # sources of the sender's copies of the current pull
        self._arenas: dict[str, torch.Tensor] = {}  # receiver: the peer's staging arenas, mapped, by id

    def _stream_on(self, device: torch.device) -> torch.cuda.Stream:
        if self._copy_stream is None or self._copy_stream.device != device:
            self._copy_stream = torch.cuda.Stream(device)
        return self._copy_stream

    @property
    def staging_bytes(self) -> int:
        """Bytes this end holds for the link (its staging buffer, or the peer's one mapped)."""
        held = self._staging if self._staging is not None else self._mapped
        return 0 if held is None else held.numel()

    # ---- sender -------------------------------------------------------------------------------------
    async def _stage_out(self, wire: torch.Tensor, offset: int, total: int,
                         ready: torch.cuda.Event | None) -> dict:
        if not _shareable(wire):
            raise KVChannelError(f"the ipc KV channel shares CUDA memory; got a {wire.device} tensor. Use "
                                 "kvChannel tcp for CPU workers")
        staging = self._staging
        fresh = staging is None or staging.numel() < total or staging.device != wire.device
        if fresh:
            self._quiesce()  # nothing of an earlier pull still copies into the buffer being dropped
            size = max(total, _MIN_STAGING)
            staging = self._staging = torch.empty(1 << (size - 1).bit_length(), dtype=torch.uint8,
                                                  device=wire.device)
            self._event = torch.cuda.Event(interprocess=True) if wire.is_cuda else None
        if not wire.is_cuda:
            staging[offset:offset + wire.numel()].copy_(wire)
            return {"map": fresh}
        side = self._stream_on(wire.device)
        if ready is not None:
            side.wait_event(ready)  # the staged layers' copies, not whatever the engine enqueued since
        else:
            side.wait_stream(torch.cuda.current_stream(wire.device))  # wire was just encoded there
        self._in_flight.append(wire)  # kept until the ack: the copy may not have run yet
        with torch.cuda.stream(side):
            staging[offset:offset + wire.numel()].copy_(wire, non_blocking=True)
        # Recorded before the control message goes out, so the receiver's wait covers this copy.
        self._event.record(side)
        return {"map": fresh}

    async def _ship(self, wire: torch.Tensor, fields: dict) -> None:
        if fields["map"]:
            handle = self._event.ipc_handle() if self._event is not None else None
            await self.stream.send_bytes(bytes(ForkingPickler.dumps((self._staging, handle))))

    async def share_arena(self, arena_id: str, buffer: torch.Tensor) -> None:
        """Sender: answer a `map` request with the arena's buffer (an IPC handle, not bytes)."""
        if not _shareable(buffer):
            await self.send_error("mismatch", f"staging arena on {buffer.device} cannot be shared over IPC")
            return
        self.stream.queue_json({"type": "arena", "arena": arena_id, "bytes": buffer.numel()})
        await self.stream.send_bytes(bytes(ForkingPickler.dumps(buffer)))

    # ---- receiver -----------------------------------------------------------------------------------
    def _landing(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        with torch.cuda.stream(self._stream_on(device)):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    async def map_arena(self, arena_id: str) -> torch.Tensor:
        """Receiver: the peer's staging arena `arena_id`, mapped on first use (KVNotFound once it is gone)."""
        mapped = self._arenas.get(arena_id)
        if mapped is not None:
            return mapped
        await self.stream.send_json({"type": "map", "arena": arena_id})
        reply = await self.stream.recv_json()
        if reply.get("type") == "error":
            raise _remote_error(reply)
        if reply.get("type") != "arena" or reply.get("arena") != arena_id:
            raise KVChannelError(f"KV server {self.stream.peer} answered {reply.get('type')!r} to a map of {arena_id}")
        data = await self.stream.recv_bytes()
        try:
            buffer = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the handle is unusable here
            raise KVChannelError(f"cannot map the prefill's staging arena on this node: {e}") from e
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
                or buffer.numel() != reply.get("bytes"):
            raise KVMismatchError("IPC arena message is not a staging arena")
        if len(self._arenas) >= _MAX_MAPPED_ARENAS:
            self._quiesce()  # no copy still reads the one being unmapped
            self._arenas.pop(next(iter(self._arenas)))
        self._arenas[arena_id] = buffer
        return buffer

    async def read_direct(self, arena_id: str, offset: int, nbytes: int, device: torch.device) -> torch.Tensor:
        """Receiver: bytes [offset, offset + nbytes) of the peer's arena, copied into a new buffer on `device`."""
        arena = await self.map_arena(arena_id)
        if offset < 0 or nbytes < 1 or offset + nbytes > arena.numel():
            raise KVMismatchError(f"bytes [{offset}, {offset + nbytes}) are outside the {arena.numel()}-byte "
                                  f"staging arena {arena_id}")
        source, out = arena[offset:offset + nbytes], self._landing(nbytes, device)
        if device.type != "cuda":
            out.copy_(source)
            return out
        side = self._stream_on(device)
        with torch.cuda.stream(side):
            out.copy_(source, non_blocking=True)
        side.synchronize()
        return out

    async def _map(self) -> None:
        data = await self.stream.recv_bytes()
        try:
            shared = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the handle is unusable here
            raise KVChannelError(f"cannot map the sender's IPC staging buffer on this node: {e}") from e
        buffer, handle = shared if isinstance(shared, tuple) and len(shared) == 2 else (None, None)
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
                or not isinstance(handle, bytes | None):
            raise KVMismatchError("IPC mapping message is not a staging buffer")
        self._mapped = buffer  # dropping the previous one unmaps it (torch's IPC cache)
        self._peer_event = None
        if handle is not None and buffer.is_cuda:  # a host landing waits on it too
            self._peer_event = torch.cuda.Event.from_ipc_handle(buffer.device, handle)

    async def _land(self, out: torch.Tensor, offset: int, msg: dict) -> None:
        if msg.get("map") is True:
            await self._map()
        elif self._mapped is None:
            raise KVChannelError(f"IPC peer {self.stream.peer} sent layers before sharing its staging buffer")
        if self._mapped.numel() < offset + out.numel():
            raise KVMismatchError(f"IPC staging buffer of {self._mapped.numel()} bytes cannot hold bytes "
                                  f"[{offset}, {offset + out.numel()}) of this payload")
        source = self._mapped[offset:offset + out.numel()]
        if not out.is_cuda:
            if self._peer_event is not None:
                self._peer_event.synchronize()  # the sender's copy into staging, before reading it here
            out.copy_(source)
            return
        side = self._stream_on(out.device)
        if self._peer_event is not None:
            side.wait_event(self._peer_event)
        # `out` is a slice of the landing buffer, which recv keeps until _settle or, on failure, _quiesce.
        with torch.cuda.stream(side):
            out.copy_(source, non_blocking=True)

    async def _settle(self, device: torch.device) -> None:
        if device.type == "cuda" and self._copy_stream is not None:
            # Copied out before the ack lets the sender reuse its staging; the host sync also makes the
            # payload safe to read from any stream of the engine thread.
            self._copy_stream.synchronize()

    def _pull_done(self) -> None:
        # Sender: the receiver acked, so it synced a copy that waited on ours; ours is done.
        self._in_flight.clear()

    def _quiesce(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self._in_flight.clear()

    async def close(self) -> None:
        await super().close()
        self._quiesce()  # then the staging buffer and the mapping can go
        self._staging = self._mapped = None
        self._arenas.clear()
        self._event = self._peer_event = None
        self._copy_stream = None
