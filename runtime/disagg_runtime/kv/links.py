"""Setting up a link: where each end sits, which channel kind suits the pair, and the handshake.

The decode end (the puller) opens the link: it says where it sits, the prefill end answers where it
sits, and the decode end picks the channel kind (or applies spec.runtime.kvChannel) and the wire codec.
For a collective link the prefill end then hosts a TCPStore and both ends build the two-rank group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

import torch

from .channel import ChannelKind, KVChannel
from .codec import CodecName, make_codec
from .collective import (
    RECEIVER_RANK,
    SENDER_RANK,
    CollectiveKVChannel,
    LinkRendezvous,
    backend_for,
    join_store,
    open_group,
)
from .errors import KVChannelError
from .framing import FramedStream
from .ipc import CudaIpcKVChannel
from .tcp import TcpKVChannel

ChannelChoice = Literal["auto", "tcp", "ipc", "nccl"]
_CLASSES: dict[str, type[KVChannel]] = {"tcp": TcpKVChannel, "ipc": CudaIpcKVChannel}


@dataclass(frozen=True)
class Endpoint:
    """Where one end of a link keeps its KV: the node, and the GPU (None on CPU)."""

    node: str
    gpu: str | None = None

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    def to_wire(self) -> dict:
        return {"node": self.node, "gpu": self.gpu}

    @classmethod
    def from_wire(cls, data: dict) -> Endpoint:
        try:
            return cls(node=str(data["node"]), gpu=data.get("gpu"))
        except (KeyError, TypeError) as e:
            raise KVChannelError(f"KV peer sent a malformed endpoint {data!r}") from e

    @classmethod
    def here(cls, device: torch.device | str = "cpu", node: str | None = None) -> Endpoint:
        """This process: the node from NODE_NAME (Kubernetes downward API) or the hostname."""
        device = torch.device(device)
        gpu = None
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            gpu = str(getattr(props, "uuid", device))
        return cls(node=node or os.environ.get("NODE_NAME") or socket.gethostname(), gpu=gpu)


def choose_channel(local: Endpoint, remote: Endpoint, override: ChannelChoice = "auto") -> ChannelKind:
    """ipc for GPUs on one node, nccl for GPUs on different nodes, tcp otherwise; `override` wins if usable."""
    both_gpu = local.on_gpu and remote.on_gpu
    same_node = local.node == remote.node
    if override == "auto":
        if both_gpu:
            return "ipc" if same_node else "nccl"
        return "tcp"
    if override == "ipc" and not same_node:
        raise KVChannelError(
            f"kvChannel ipc needs both workers on one node; prefill is on {remote.node}, decode on "
            f"{local.node}. Use auto, nccl or tcp"
        )
    return override


async def open_link(stream: FramedStream, *, local: Endpoint, device: torch.device,
                    override: ChannelChoice = "auto", codec: CodecName = "none") -> KVChannel:
    """Decode end: handshake on a fresh connection and return the receiving channel."""
    await stream.send_json({"type": "hello", "endpoint": local.to_wire()})
    welcome = await stream.recv_json()
    if welcome.get("type") != "welcome":
        raise KVChannelError(f"KV server {stream.peer} answered {welcome.get('type')!r} to hello")
    kind = choose_channel(local, Endpoint.from_wire(welcome.get("endpoint", {})), override)
    backend = backend_for(device)
    await stream.send_json({"type": "use", "channel": kind, "codec": codec, "backend": backend})
    ready = await stream.recv_json()
    if ready.get("type") != "ready":
        raise KVChannelError(f"KV server {stream.peer} refused a {kind} link: {ready.get('message', ready)}")
    wire_codec = make_codec(codec)
    if kind != "nccl":
        return _CLASSES[kind](stream, codec=wire_codec)
    host = stream.peer.rsplit(":", 1)[0]
    store = join_store(host, int(ready["storePort"]), timeout=stream.timeout)
    group = await open_group(store, rank=RECEIVER_RANK, backend=backend, timeout=stream.timeout, device=device)
    return CollectiveKVChannel(stream, codec=wire_codec, group=group, rank=RECEIVER_RANK, backend=backend,
                               device=device, timeout=stream.timeout, keepalive=store)


async def accept_link(stream: FramedStream, *, local: Endpoint, device: torch.device) -> KVChannel:
    """Prefill end: answer the handshake a decode end started; returns the sending channel."""
    hello = await stream.recv_json()
    if hello.get("type") != "hello":
        raise KVChannelError(f"KV client {stream.peer} opened with {hello.get('type')!r}, expected hello")
    await stream.send_json({"type": "welcome", "endpoint": local.to_wire()})
    use = await stream.recv_json()
    kind, codec_name, backend = use.get("channel"), use.get("codec", "none"), use.get("backend", "gloo")
    try:
        codec = make_codec(codec_name)
        if kind not in ("tcp", "ipc", "nccl") or backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown channel {kind!r} / backend {backend!r}")
        if backend != backend_for(device):
            raise ValueError(f"decode end uses {backend} but this prefill end keeps KV on {device}")
    except ValueError as e:
        await stream.send_json({"type": "refused", "message": str(e)})
        raise KVChannelError(f"refused a KV link from {stream.peer}: {e}") from e
    if kind != "nccl":
        await stream.send_json({"type": "ready"})
        return _CLASSES[kind](stream, codec=codec)
    rendezvous = LinkRendezvous(timeout=stream.timeout)
    await stream.send_json({"type": "ready", "storePort": rendezvous.port})
    group = await open_group(rendezvous.store, rank=SENDER_RANK, backend=backend, timeout=stream.timeout,
                             device=device)
    return CollectiveKVChannel(stream, codec=codec, group=group, rank=SENDER_RANK, backend=backend,
                               device=device, timeout=stream.timeout, keepalive=rendezvous)
