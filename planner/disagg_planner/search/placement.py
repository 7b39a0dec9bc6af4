"""Packing instances onto nodes: which node and which GPU indices each pipeline stage of each instance gets.

Rules: a tensor-parallel group never spans nodes (its all-reduces need NVLink); a whole instance stays on one
node when it fits (its pipeline hops then use NVLink too); in a low node-affinity plan the prefill and decode
segments of the same stage share a node so the KV cache moves over NVLink. GPUs are handed out from the lowest
free index in order of decreasing group size, so every power-of-two group starts at a multiple of its size
(aligned to NVLink/NVSwitch islands on the usual 8-GPU boards).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..api.plan import InstancePlacement, Phase


@dataclass(frozen=True)
class InstanceRequest:
    """`count` instances of one phase, each `pp` stages of `tp` GPUs."""

    phase: Phase
    tp: int
    pp: int
    count: int


@dataclass(frozen=True)
class UnitRequest:
    """`count` low-affinity units: per stage, a prefill segment of `prefill_tp` GPUs next to a decode one."""

    prefill_tp: int
    decode_tp: int
    pp: int
    count: int


class _Nodes:
    """Free-GPU bookkeeping: GPUs are only taken, never returned, so each node's free GPUs are a suffix.

    Nodes are kept in one min-heap of node indices per free-GPU count (stale entries are skipped when met),
    so a best-fit lookup costs O(GPUs per node + log nodes) and a whole packing is linear in the nodes.
    """

    def __init__(self, nodes: int, gpus_per_node: int) -> None:
        self.size = gpus_per_node
        self.used = [0] * nodes
        self.by_free: list[list[int]] = [[] for _ in range(gpus_per_node + 1)]
        self.by_free[gpus_per_node] = list(range(nodes))  # sorted: already a heap

    def free(self, node: int) -> int:
        return self.size - self.used[node]

    def best_fit(self, need: int, prefer: int | None = None) -> int | None:
        """The node with the least free room that still holds `need` GPUs (`prefer` first if it fits)."""
        if prefer is not None and self.free(prefer) >= need:
            return prefer
        for free in range(max(need, 1), self.size + 1):
            heap = self.by_free[free]
            while heap and self.free(heap[0]) != free:
                heapq.heappop(heap)
            if heap:
                return heap[0]
        return None

    def take(self, node: int, need: int) -> list[int]:
        start = self.used[node]
        self.used[node] += need
        heapq.heappush(self.by_free[self.free(node)], node)
        return list(range(start, start + need))


def pack_instances(
    requests: list[InstanceRequest], nodes: int, gpus_per_node: int
) -> list[InstancePlacement] | None:
    """Place every instance of every request (high node-affinity); None when they cannot all fit."""
    if any(r.tp > gpus_per_node for r in requests):
        return None
    state = _Nodes(nodes, gpus_per_node)
    out: list[InstancePlacement] = []
    order = sorted(requests, key=lambda r: (-r.tp, -r.tp * r.pp))
    for req in order:
        for index in range(req.count):
            stages = _place_stages(state, req.tp, req.pp)
            if stages is None:
                return None
            out.extend(
                InstancePlacement(phase=req.phase, instance=index, stage=s, node=node, gpus=gpus)
                for s, (node, gpus) in enumerate(stages)
            )
    return _in_plan_order(out)


def _place_stages(state: _Nodes, tp: int, pp: int) -> list[tuple[int, list[int]]] | None:
    whole = state.best_fit(tp * pp)
    if whole is not None:
        gpus = state.take(whole, tp * pp)
        return [(whole, gpus[s * tp:(s + 1) * tp]) for s in range(pp)]
    stages: list[tuple[int, list[int]]] = []
    node: int | None = None
    for _ in range(pp):
        node = state.best_fit(tp, prefer=node)
        if node is None:
            return None
        stages.append((node, state.take(node, tp)))
    return stages


def pack_units(req: UnitRequest, nodes: int, gpus_per_node: int) -> list[InstancePlacement] | None:
    """Place low node-affinity units: unit i is prefill instance i and decode instance i, stage by stage."""
    width = req.prefill_tp + req.decode_tp
    if width > gpus_per_node:
        return None
    state = _Nodes(nodes, gpus_per_node)
    out: list[InstancePlacement] = []
    # The wider segment goes first within each stage's block so both stay aligned to their own size.
    first, second = (
        (("prefill", req.prefill_tp), ("decode", req.decode_tp))
        if req.prefill_tp >= req.decode_tp
        else (("decode", req.decode_tp), ("prefill", req.prefill_tp))
    )
    for index in range(req.count):
        node: int | None = None
        for stage in range(req.pp):
            node = state.best_fit(width, prefer=node)
            if node is None:
                return None
            gpus = state.take(node, width)
            for (phase, tp), offset in ((first, 0), (second, first[1])):
                out.append(InstancePlacement(phase=phase, instance=index, stage=stage, node=node,
                                             gpus=gpus[offset:offset + tp]))
    return _in_plan_order(out)


def pack_colocated(tp: int, pp: int, count: int, nodes: int, gpus_per_node: int) -> list[InstancePlacement] | None:
    """Place `count` colocated instances."""
    return pack_instances([InstanceRequest("colocated", tp, pp, count)], nodes, gpus_per_node)


_PHASE_ORDER = {"prefill": 0, "decode": 1, "colocated": 2}


def _in_plan_order(items: list[InstancePlacement]) -> list[InstancePlacement]:
    return sorted(items, key=lambda p: (_PHASE_ORDER[p.phase], p.instance, p.stage))


def nodes_used(placement: list[InstancePlacement]) -> int:
    """How many distinct nodes a placement touches."""
    return len({p.node for p in placement})
