"""Prefill instances: FCFS queues, batches under a token budget, pipeline stages.

Each arrival goes to the instance with the fewest queued tokens (ties: the one whose first stage frees
first). A batch forms when stage 0 frees: queued prompts are taken in order while their tokens fit the
budget (a prompt longer than the budget runs alone). With pp stages the runtime cuts a batch into up to pp
micro-batches that follow each other through the stages (`LatencyModel.pipelined_step`), and starts the
next batch when this one has left the last stage.

Prefill-side memory for KV waiting to be pulled is not bounded here: at rates that meet the SLOs the
waiting set is small, and past them attainment is already lost.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

import numpy as np

from ..latency import LatencyModel
from .types import PhaseShape


class _PrefillInstance:
    __slots__ = ("queue", "queued_tokens", "stage_free")

    def __init__(self, pp: int) -> None:
        self.queue: deque[int] = deque()
        self.queued_tokens = 0
        self.stage_free = [0.0] * pp


def simulate_prefill(
    shape: PhaseShape,
    latency: LatencyModel,
    budget: int,
    arrivals: list[float],
    inputs: list[int],
) -> np.ndarray:
    """Prefill completion time (first token) of each request; `arrivals` must be sorted."""
    tp, pp = shape.tp, shape.pp
    link = shape.stage_link_gbps or latency.intra_node_gbps
    act_send_per_token = latency.stage(tp, pp).hidden_bytes_per_token / (link * 1e9)
    stage_time = latency.prefill_stage_time
    done = np.empty(len(arrivals))
    instances = [_PrefillInstance(pp) for _ in range(shape.instances)]

    def start_batches(inst: _PrefillInstance, before: float) -> None:
        """Start every batch whose start time precedes `before` (its members are then all known)."""
        queue, stages = inst.queue, inst.stage_free
        while queue:
            start = max(stages[0], arrivals[queue[0]])
            if start >= before:
                return
            members = [queue.popleft()]
            tokens = inputs[members[0]]
            while queue and arrivals[queue[0]] <= start and tokens + inputs[queue[0]] <= budget:
                j = queue.popleft()
                members.append(j)
                tokens += inputs[j]
            inst.queued_tokens -= tokens
            sum_sq = sum(inputs[j] * inputs[j] for j in members)
            if pp == 1:
                finish = start + stage_time(tp, pp, len(members), tokens, sum_sq)
            else:
                parts = LatencyModel.micro_batches(pp, len(members))
                t = stage_time(tp, pp, -(-len(members) // parts), -(-tokens // parts), -(-sum_sq // parts))
                finish = start + (parts + pp - 1) * t + (pp - 1) * (tokens / parts) * act_send_per_token
            stages[:] = [finish] * pp
            for j in members:
                done[j] = finish

    if len(instances) == 1:
        single = instances[0]
        queue, stages = single.queue, single.stage_free
        for i, t in enumerate(arrivals):
            if queue and max(stages[0], arrivals[queue[0]]) < t:
                start_batches(single, t)  # (called only when a batch would start before this arrival)
            queue.append(i)
            single.queued_tokens += inputs[i]
    else:
        _route(instances, arrivals, inputs, start_batches)
    for inst in instances:
        start_batches(inst, float("inf"))
    return done


def _route(
    instances: list[_PrefillInstance], arrivals: list[float], inputs: list[int],
    start_batches: Callable[[_PrefillInstance, float], None],
) -> None:
    """Queue each arrival on the instance with the fewest queued tokens (ties: first stage free first, then index).

    Two heaps keep this O(log instances) per request, so a run's cost does not grow with the replica count:
    `starts` holds, for each instance with a queue, when its next batch starts (only those before the
    arrival are advanced); `load` holds (queued tokens, stage-0 free time, index) entries, stale ones
    skipped when they reach the top.
    """
    def key(d: int) -> tuple[int, float, int]:
        inst = instances[d]
        return inst.queued_tokens, inst.stage_free[0], d

    starts: list[tuple[float, int]] = []
    load = [key(d) for d in range(len(instances))]  # sorted, so already a heap
    for i, t in enumerate(arrivals):
        while starts and starts[0][0] < t:
            _, d = heapq.heappop(starts)
            inst = instances[d]
            start_batches(inst, t)
            heapq.heappush(load, key(d))
            if inst.queue:
                heapq.heappush(starts, (max(inst.stage_free[0], arrivals[inst.queue[0]]), d))
        while load[0] != key(load[0][2]):
            heapq.heappop(load)
        d = load[0][2]
        inst = instances[d]
        if not inst.queue:
            heapq.heappush(starts, (max(inst.stage_free[0], t), d))
        inst.queue.append(i)
        inst.queued_tokens += inputs[i]
        heapq.heappush(load, key(d))
