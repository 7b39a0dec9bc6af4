"""torch.distributed data plane: point-to-point send/recv in a two-rank process group per link.

NCCL between GPUs; gloo runs the same code path on CPU (tests, and a CPU fallback that avoids
Python-level copies). Each link builds its own process group from a TCPStore that the prefill end
hosts, so no process-wide default group exists and a process can hold many links.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Literal

import torch
import torch.distributed as dist

from .channel import KVChannel
from .codec import LayerCodec
from .errors import KVChannelError, KVTimeout
from .framing import FramedStream

Backend = Literal["nccl", "gloo"]
SENDER_RANK, RECEIVER_RANK = 0, 1


def backend_for(device: torch.device) -> Backend:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


class LinkRendezvous:
    """The TCPStore a prefill end hosts for one link; the decode end joins it by host and port."""

    def __init__(self, *, timeout: float) -> None:
        self.store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                                   timeout=dt.timedelta(seconds=timeout))

    @property
    def port(self) -> int:
        return self.store.port


def _make_group(store: dist.Store, rank: int, backend: Backend, timeout: float,
                device: torch.device) -> dist.ProcessGroup:
    prefixed = dist.PrefixStore("disagg-kv", store)
    td = dt.timedelta(seconds=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, 2, td)
    if not dist.is_nccl_available():
        raise KVChannelError("the nccl KV channel needs a torch build with NCCL; use kvChannel tcp or ipc")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = td
    torch.cuda.set_device(device)
    return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)


async def open_group(store: dist.Store, *, rank: int, backend: Backend, timeout: float,
                     device: torch.device) -> dist.ProcessGroup:
    """Build the link's group off the event loop (it blocks until both ranks have joined)."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_make_group, store, rank, backend, timeout, device), timeout + 5
        )
    except asyncio.TimeoutError as e:
        raise KVTimeout(f"KV link rendezvous ({backend}) did not complete within {timeout:.0f}s") from e
    except RuntimeError as e:
        raise KVChannelError(f"KV link rendezvous ({backend}) failed: {e}") from e


def join_store(host: str, port: int, *, timeout: float) -> dist.Store:
    """The decode end's client of the prefill end's TCPStore."""
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=dt.timedelta(seconds=timeout))
    except RuntimeError as e:
        raise KVChannelError(f"cannot join the KV link store at {host}:{port}: {e}") from e


class CollectiveKVChannel(KVChannel):
    """Control messages on the TCP stream, tensor bytes through `group` (rank 0 sends, rank 1 receives)."""

    kind = "nccl"

    def __init__(self, stream: FramedStream, *, codec: LayerCodec, group: dist.ProcessGroup, rank: int,
                 backend: Backend, device: torch.device, timeout: float,
                 keepalive: object | None = None) -> None:
        super().__init__(stream, codec=codec)
        self.group = group
        self.peer = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK
        self.backend = backend
        self.device = device
        self.timeout = dt.timedelta(seconds=timeout)
        self._keepalive = keepalive  # the store must outlive the group that was built on it

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                raise KVTimeout(f"{self.backend} {what} timed out after {self.timeout}") from e
            raise KVChannelError(f"{self.backend} {what} failed: {e}") from e

    def _landing(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    async def _ship(self, wire: torch.Tensor, fields: dict) -> None:
        await self.stream.flush()  # the receiver posts its recv on reading the queued layers message
        flat = wire.to(self.device).contiguous()
        await asyncio.to_thread(lambda: self._wait(self.group.send([flat], self.peer, 0), "send"))

    async def _land(self, out: torch.Tensor, offset: int, msg: dict) -> None:
        await asyncio.to_thread(lambda: self._wait(self.group.recv([out], self.peer, 0), "recv"))

    async def close(self) -> None:
        await super().close()
        try:
            self.group.shutdown()
        except (RuntimeError, AttributeError):
            pass  # gloo groups have nothing to shut down on older torch builds
