"""Moving one rank's share of a request's KV: pulling it piece by piece on the decode end, cutting pieces on the prefill end."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from ..parallel.ranks import Parallelism
from .errors import KVMismatchError
from .payload import TORCH_DTYPES, KVHeader, KVPayload
from .puller import KVAddress, KVPuller
from .reshard import KVSlice, assemble, cut, plan_pulls, share_of
from .server import KVLease
from .staged import StagedKV


@dataclass(frozen=True)
class ShareTarget:
    """The decode rank a share is for, and the model facts its pieces must match."""

    shape: Parallelism
    rank: int
    model_id: str
    dtype: str
    head_dim: int
    num_layers: int  # of the whole model
    num_kv_heads: int  # of the whole model

    @property
    def share(self) -> KVSlice:
        return share_of(self.shape.rank(self.rank), self.num_layers, self.num_kv_heads)


async def pull_share(puller: KVPuller, sources: list[KVAddress], src: Parallelism, target: ShareTarget,
                     request_id: str, num_tokens: int, device: torch.device, ticket: str | None = None) -> KVPayload:
    """This rank's share of `request_id`'s KV, pulled straight from the prefill ranks that hold its pieces."""
    if len(sources) != src.world:
        raise KVMismatchError(f"request {request_id}: {len(sources)} KV sources for a tp={src.tp} x pp={src.pp} "
                              "prefill instance")
    plan = plan_pulls(src, target.shape, target.rank, num_layers=target.num_layers,
                      num_kv_heads=target.num_kv_heads)

    async def one(piece: KVSlice, address: KVAddress):
        def check(header: KVHeader) -> None:
            got = (header.model_id, header.dtype, header.num_tokens, header.num_layers, header.num_kv_heads)
            want = (target.model_id, target.dtype, num_tokens, len(piece.layers), len(piece.heads))
            if got != want:
                raise KVMismatchError(f"request {request_id}: KV piece {piece.model_dump()} from {address} is "
                                      f"(model, dtype, tokens, layers, heads) = {got}, expected {want}")

        payload = await puller.pull(address, request_id, expect=check, kv_slice=piece, ticket=ticket)
        return piece, payload.keys, payload.values

    pieces = await asyncio.gather(*(one(p.slice, sources[p.src_rank]) for p in plan))
    share = target.share
    try:
        keys, values = assemble(share, list(pieces), num_tokens=num_tokens, head_dim=target.head_dim,
                                dtype=TORCH_DTYPES[target.dtype], device=device)
    except ValueError as e:
        raise KVMismatchError(f"request {request_id}: {e}") from e
    header = KVHeader(request_id=request_id, model_id=target.model_id, num_layers=len(share.layers),
                      num_kv_heads=len(share.heads), head_dim=target.head_dim, dtype=target.dtype,
                      num_tokens=num_tokens)
    return KVPayload(header, keys, values)


async def _keep(_ok: bool) -> None:
    """A piece's lease frees nothing: the prefill's rank 0 frees the request once every piece arrived."""


def slice_lease(payload: KVPayload, held: KVSlice, piece: KVSlice,
                release: Callable[[bool], Awaitable[None]] = _keep) -> KVLease:
    """A lease on `piece` of a rank's KV `payload` (which covers `held`)."""
    if not piece.within(held.layers, held.heads):
        raise KVMismatchError(f"request {payload.header.request_id}: slice {piece.model_dump()} is not held here "
                              f"(this rank holds {held.model_dump()})")
    keys, values = cut(payload.keys, payload.values, held, piece)
    header = payload.header.model_copy(update={"num_layers": len(piece.layers), "num_kv_heads": len(piece.heads)})
    # Staged (one copy of the piece) so that it ships as one batch, not one control frame per layer.
    return KVLease(header, StagedKV.of(KVPayload(header, keys, values)), release)


@dataclass(frozen=True)
class ShareSpec:
    """Where a request's KV sits on a prefill instance (sent to every decode rank in the "pull" descriptor)."""

    sources: tuple[tuple[str, int], ...]  # KV server (host, port) of each prefill rank
    src_tp: int
    src_pp: int
    num_tokens: int
    ticket: str | None = None  # what rank 0 of the prefill instance issued with the request's KV

    @property
    def src(self) -> Parallelism:
        return Parallelism(self.src_tp, self.src_pp)

    @property
    def addresses(self) -> list[KVAddress]:
        return [KVAddress(h, p) for h, p in self.sources]


async def pull_spec(puller: KVPuller, spec: ShareSpec, target: ShareTarget, request_id: str,
                    device: torch.device) -> KVPayload:
    """`pull_share` for a ShareSpec."""
    return await pull_share(puller, spec.addresses, spec.src, target, request_id, spec.num_tokens, device,
                            ticket=spec.ticket)
