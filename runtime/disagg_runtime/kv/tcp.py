"""TCP data plane: tensor bytes on the control stream itself (CPU, or GPUs on different nodes without NCCL)."""

from __future__ import annotations

import torch

from .channel import KVChannel


class TcpKVChannel(KVChannel):
    """Each batch of layers as one raw byte frame; GPU tensors are staged through host memory."""

    kind = "tcp"

    def _landing(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)  # host memory; the payload moves to `device` in one copy

    async def _ship(self, wire: torch.Tensor, fields: dict) -> None:
        await self.stream.send_tensor(wire)

    async def _land(self, out: torch.Tensor, offset: int, msg: dict) -> None:
        await self.stream.recv_tensor_into(out)
