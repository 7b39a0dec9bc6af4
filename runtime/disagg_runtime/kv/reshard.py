"""KV resharding between instances of different parallelism: which slices each decode rank pulls from where.

A decode rank owns the KV of its stage's layers and its tp slot's KV heads. `plan_pulls` cuts exactly that
(layer range x head range) into pieces, each held whole by one prefill rank, and names that rank; the decode
rank pulls every piece straight from it. Nothing is gathered on one rank: each rank receives its own share
and no more. Where a prefill KV head is replicated (tp > KV heads) the replica is picked by the decode
rank's tp slot, so decode ranks spread their pulls over the copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..parallel.ranks import Parallelism, RankLayout, stage_layers


class KVSlice(BaseModel):
    """Global layer and KV-head ranges [start, stop) of one request's KV (the `slice` of a pull message)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer_start: int = Field(ge=0)
    layer_stop: int = Field(ge=1)
    head_start: int = Field(ge=0)
    head_stop: int = Field(ge=1)

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_stop)

    @property
    def heads(self) -> range:
        return range(self.head_start, self.head_stop)

    @classmethod
    def of(cls, layers: range, heads: range) -> KVSlice:
        return cls(layer_start=layers.start, layer_stop=layers.stop, head_start=heads.start, head_stop=heads.stop)

    def within(self, layers: range, heads: range) -> bool:
        return (layers.start <= self.layer_start and self.layer_stop <= layers.stop
                and heads.start <= self.head_start and self.head_stop <= heads.stop)


@dataclass(frozen=True)
class Pull:
    """One piece of a decode rank's share, held whole by prefill rank `src_rank`."""

    src_rank: int
    slice: KVSlice


def share_of(layout: RankLayout, num_layers: int, num_kv_heads: int) -> KVSlice:
    """The KV a rank holds (global coordinates)."""
    return KVSlice.of(layout.layers(num_layers), layout.kv_heads(num_kv_heads))


def plan_pulls(src: Parallelism, dst: Parallelism, dst_rank: int, *, num_layers: int,
               num_kv_heads: int) -> list[Pull]:
    """The pulls that give decode rank `dst_rank` exactly its share, each from one prefill rank."""
    want = share_of(dst.rank(dst_rank), num_layers, num_kv_heads)
    dst_slot = dst.rank(dst_rank).tp_rank
    pulls: list[Pull] = []
    for stage, layers in enumerate(stage_layers(num_layers, src.pp)):
        lo, hi = max(layers.start, want.layer_start), min(layers.stop, want.layer_stop)
        if lo >= hi:
            continue
        for head_lo, head_hi, slot in _head_pieces(num_kv_heads, src.tp, want.heads, dst_slot):
            pulls.append(Pull(stage * src.tp + slot, KVSlice(layer_start=lo, layer_stop=hi, head_start=head_lo,
                                                             head_stop=head_hi)))
    return pulls


def _head_pieces(num_kv_heads: int, tp: int, heads: range, dst_slot: int) -> list[tuple[int, int, int]]:
    """(head start, head stop, src tp slot) pieces covering `heads` on a tp-way prefill stage."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        out = []
        for slot in range(heads.start // per, (heads.stop - 1) // per + 1):
            lo, hi = max(heads.start, slot * per), min(heads.stop, (slot + 1) * per)
            out.append((lo, hi, slot))
        return out
    replicas = tp // num_kv_heads
    return [(h, h + 1, h * replicas + dst_slot % replicas) for h in heads]


def cut(keys: list[torch.Tensor], values: list[torch.Tensor], held: KVSlice,
        piece: KVSlice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The `piece` of a rank's KV (per layer [tokens, heads, dim] over `held`), as contiguous copies."""
    layers = range(piece.layer_start - held.layer_start, piece.layer_stop - held.layer_start)
    h0, n = piece.head_start - held.head_start, piece.head_stop - piece.head_start
    return ([keys[i][:, h0:h0 + n].contiguous() for i in layers],
            [values[i][:, h0:h0 + n].contiguous() for i in layers])


def assemble(share: KVSlice, pieces: list[tuple[KVSlice, list[torch.Tensor], list[torch.Tensor]]], *,
             num_tokens: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Place received pieces into this rank's per-layer K and V; ValueError unless they tile `share` exactly."""
    nh = share.head_stop - share.head_start
    shape = (num_tokens, nh, head_dim)
    keys = [torch.empty(shape, dtype=dtype, device=device) for _ in share.layers]
    values = [torch.empty(shape, dtype=dtype, device=device) for _ in share.layers]
    covered = torch.zeros(len(share.layers), nh, dtype=torch.bool)
    for piece, ks, vs in pieces:
        if not piece.within(share.layers, share.heads):
            raise ValueError(f"KV piece {piece} lies outside this rank's share {share}")
        h0 = piece.head_start - share.head_start
        n = piece.head_stop - piece.head_start
        for j, (k, v) in enumerate(zip(ks, vs, strict=True)):
            i = piece.layer_start - share.layer_start + j
            keys[i][:, h0:h0 + n] = k
            values[i][:, h0:h0 + n] = v
        cells = covered[piece.layer_start - share.layer_start:piece.layer_stop - share.layer_start, h0:h0 + n]
        if bool(cells.any()):
            raise ValueError(f"KV piece {piece} overlaps another piece of {share}")
        cells.fill_(True)
    if not bool(covered.all()):
        raise ValueError(f"KV pieces leave parts of {share} uncovered")
    return keys, values
