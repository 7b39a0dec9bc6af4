"""Test and benchmark helpers: random payloads, a parked-KV source, and a connected stream pair."""

from __future__ import annotations

import asyncio

import torch

from .arena import ArenaPool, ArenaRange
from .channel import payload_layers
from .errors import KVNotFound
from .framing import FramedStream
from .payload import TORCH_DTYPES, KVHeader, KVPayload
from .server import KVLease
from .staged import StagedKV, staged_nbytes


def make_payload(request_id: str = "r1", *, layers: int = 3, tokens: int = 37, heads: int = 2, dim: int = 8,
                 dtype: str = "bfloat16", seed: int = 0, model_id: str = "m") -> KVPayload:
    """Random K/V of the given shape; the same seed gives the same tensors in any process."""
    g = torch.Generator().manual_seed(seed)
    header = KVHeader(request_id=request_id, model_id=model_id, num_layers=layers, num_kv_heads=heads,
                      head_dim=dim, dtype=dtype, num_tokens=tokens)
    t = TORCH_DTYPES[dtype]
    keys = [torch.randn(tokens, heads, dim, generator=g).to(t) for _ in range(layers)]
    values = [torch.randn(tokens, heads, dim, generator=g).to(t) for _ in range(layers)]
    return KVPayload(header, keys, values)


def stage_in_arena(pool: ArenaPool, payload: KVPayload) -> tuple[StagedKV, ArenaRange]:
    """A complete staging of `payload` in a range of `pool`'s arenas, as a prefill engine stages KV (its
    copies enqueued on the current stream)."""
    where = pool.alloc(staged_nbytes(payload.header))
    if where is None:
        raise ValueError(f"{payload.header.request_id}: {payload.header.nbytes} bytes do not fit the arena budget")
    staged = StagedKV(payload.header, pool.device, buffer=where.tensor)
    for i, (k, v) in enumerate(zip(payload.keys, payload.values, strict=True)):
        staged.stage(i, k, v)
    staged.mark_ready(payload.header.num_layers)
    return staged, where


class DictSource:
    """KV parked by request id; a successful send removes it, as the prefill worker does."""

    def __init__(self, payloads: list[KVPayload] | None = None) -> None:
        self.parked = {p.header.request_id: p for p in payloads or []}
        self.released: list[tuple[str, bool]] = []

    async def checkout(self, request_id: str, ticket: str | None = None) -> KVLease:
        if request_id not in self.parked:
            raise KVNotFound(f"no KV parked for {request_id}")
        payload = self.parked[request_id]

        async def release(ok: bool) -> None:
            self.released.append((request_id, ok))
            if ok:
                self.parked.pop(request_id, None)

        return KVLease(payload.header, payload_layers(payload), release)


async def stream_pair(timeout: float = 5.0) -> tuple[FramedStream, FramedStream]:
    """Two FramedStreams connected over loopback TCP: (server end, client end)."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(r, w):
        accepted.set_result(FramedStream(r, w, timeout=timeout))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await FramedStream.connect("127.0.0.1", port, timeout=timeout)
    srv = await accepted
    server.close()
    return srv, client


class ShareSource:
    """One prefill rank's share of parked payloads: serves slices of it, records releases (rank 0's job)."""

    def __init__(self, payloads: list[KVPayload], held) -> None:
        from .reshard import KVSlice, cut

        self.held = held
        self.parked: dict[str, KVPayload] = {}
        for p in payloads:
            whole = KVSlice.of(range(p.header.num_layers), range(p.header.num_kv_heads))
            keys, values = cut(p.keys, p.values, whole, held)
            header = p.header.model_copy(update={"num_layers": len(held.layers), "num_kv_heads": len(held.heads)})
            self.parked[p.header.request_id] = KVPayload(header, keys, values)
        self.released: list[str] = []

    async def checkout(self, request_id: str, ticket: str | None = None) -> KVLease:
        raise KVNotFound("slices only")

    async def checkout_slice(self, request_id: str, kv_slice, ticket: str | None = None) -> KVLease:
        from .sharded import slice_lease

        if request_id not in self.parked:
            raise KVNotFound(f"no KV parked for {request_id}")
        return slice_lease(self.parked[request_id], self.held, kv_slice)

    async def release_pulled(self, request_id: str, ticket: str | None = None) -> None:
        if self.parked.pop(request_id, None) is None:
            raise KVNotFound(f"no KV parked for {request_id}")
        self.released.append(request_id)
