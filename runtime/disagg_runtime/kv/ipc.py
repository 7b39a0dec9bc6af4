"""CUDA IPC data plane (prefill and decode on one node): ship memory handles, not bytes.

The sender pickles each layer's tensors with torch.multiprocessing's reductions, which turn a CUDA
tensor into a cudaIpc memory handle plus a shared reference count; the receiver maps the sender's
memory and copies it into its own cache with a device-to-device copy (NVLink/PCIe). The sender keeps
every tensor alive until the receiver's ack, after which the mapping is gone.
"""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as torch_mp

from .channel import KVChannel, KVHeader, LayerStream, TransferStats
from .codec import PartSpec
from .errors import KVChannelError, KVMismatchError


def _shareable(t: torch.Tensor) -> bool:
    # CPU tensors only travel by name under the file_system strategy; the default (file descriptors)
    # needs a unix socket between related processes, which a TCP control link is not.
    return t.is_cuda or torch_mp.get_sharing_strategy() == "file_system"


class CudaIpcKVChannel(KVChannel):
    """Layers as IPC handles on the control stream; the receiver copies, then acks."""

    kind = "ipc"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pinned: list[torch.Tensor] = []

    async def send(self, header: KVHeader, layers: LayerStream) -> TransferStats:
        try:
            return await super().send(header, layers)
        finally:
            self._pinned.clear()  # acked (or failed): the receiver no longer maps our memory

    async def _send_parts(self, parts: list[torch.Tensor]) -> None:
        parts = [p.contiguous() for p in parts]
        for p in parts:
            if not _shareable(p):
                raise KVChannelError(
                    f"the ipc KV channel shares CUDA memory; got a {p.device} tensor. Use kvChannel tcp "
                    "for CPU workers"
                )
        self._pinned.extend(parts)
        await self.stream.send_bytes(bytes(ForkingPickler.dumps(parts)))

    async def _recv_parts(self, specs: list[PartSpec], device: torch.device) -> list[torch.Tensor]:
        data = await self.stream.recv_bytes()
        try:
            shared = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the handle is unusable here
            raise KVChannelError(f"cannot map the sender's IPC handles on this node: {e}") from e
        if not isinstance(shared, list) or len(shared) != len(specs):
            raise KVMismatchError(f"IPC layer carries {type(shared).__name__}, expected {len(specs)} tensors")
        out = []
        for spec, t in zip(specs, shared, strict=True):
            if PartSpec.of(t) != spec:
                raise KVMismatchError(f"IPC tensor is {PartSpec.of(t)}, header promised {spec}")
            out.append(t.to(device, copy=True))
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # copies done before the ack frees the source
        del shared  # drop the mappings before the ack lets the sender free its memory
        return out
