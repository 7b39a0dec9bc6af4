"""Where each rank of a tp x pp instance sits: its pipeline stage, its tensor-parallel slot, its layers and KV heads.

Rank numbering is stage-major (rank = stage * tp + tp_rank), so one node segment of a low node-affinity
plan holds whole stages: consecutive ranks. Layers split into contiguous stage ranges, the first stages
taking one more when they do not divide evenly. KV heads split whole over the tp ranks of a stage when
tp divides them; when tp exceeds them (GQA with few KV heads) each KV head is replicated on tp / kv_heads
consecutive ranks, the way Megatron-style tensor parallelism does it.
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelShapeError(ValueError):
    """A (tp, pp) that cannot split this model."""


@dataclass(frozen=True)
class Parallelism:
    """An instance's tensor- and pipeline-parallel degrees."""

    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ParallelShapeError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def rank(self, rank: int) -> RankLayout:
        return RankLayout(self, rank)

    def ranks(self) -> list[RankLayout]:
        return [RankLayout(self, r) for r in range(self.world)]


@dataclass(frozen=True)
class RankLayout:
    """One rank of an instance."""

    shape: Parallelism
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.shape.world:
            raise ParallelShapeError(f"rank {self.rank} is not in a tp={self.shape.tp} x pp={self.shape.pp} instance")

    @property
    def stage(self) -> int:
        return self.rank // self.shape.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.shape.tp

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.shape.pp - 1

    def peer(self, stage: int) -> int:
        """The rank with this rank's tp slot in `stage` (pipeline neighbours talk tp slot to tp slot)."""
        return stage * self.shape.tp + self.tp_rank

    def layers(self, num_layers: int) -> range:
        return stage_layers(num_layers, self.shape.pp)[self.stage]

    def kv_heads(self, num_kv_heads: int) -> range:
        return kv_head_range(num_kv_heads, self.shape.tp, self.tp_rank)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of the `pp` stages (earlier stages take the remainder)."""
    if pp > num_layers:
        raise ParallelShapeError(f"pp={pp} stages cannot split {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def check_kv_split(num_kv_heads: int, tp: int) -> None:
    """ParallelShapeError unless KV heads split whole over tp, or tp is a multiple of them (replication)."""
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ParallelShapeError(f"{num_kv_heads} KV heads can neither be split over nor replicated on tp={tp}")


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """The KV heads tp slot `tp_rank` holds."""
    check_kv_split(num_kv_heads, tp)
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    replicas = tp // num_kv_heads
    head = tp_rank // replicas
    return range(head, head + 1)
