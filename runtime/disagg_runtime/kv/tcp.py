"""TCP data plane: tensor bytes on the control stream itself (CPU, or GPUs on different nodes without NCCL)."""

from __future__ import annotations

import torch

from .channel import KVChannel
from .codec import PartSpec


class TcpKVChannel(KVChannel):
    """Layers as raw byte frames; GPU tensors are staged through host memory."""

    kind = "tcp"

    async def _send_parts(self, parts: list[torch.Tensor]) -> None:
        for p in parts:
            await self.stream.send_tensor(p)

    async def _recv_parts(self, specs: list[PartSpec], device: torch.device) -> list[torch.Tensor]:
        out = []
        for spec in specs:
            buf = torch.empty(spec.shape, dtype=spec.dtype)
            await self.stream.recv_tensor_into(buf)
            out.append(buf)
        return out

    def _encode_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # bytes land in host memory; decoded layers then move to `device`
