"""Decode instances: pull-based KV admission and continuous batching, advanced in closed form.

A request whose prefill finished is assigned to the decode instance with the least KV committed
(reserved + waiting), and waits there FCFS. The instance pulls the head's KV only when its reservation
(input + output tokens) fits its KV capacity; meanwhile the KV stays in prefill memory (the paper's pull
model), so a burst of prefills cannot overrun decode memory. Transfers on one instance's link run one
after another. A transferred request joins the running batch at the next round boundary; every round
gives each running request one token, and a request leaves after output_len - 1 rounds (its first token
came from prefill).

Between batch changes the instance runs rounds back to back, so it is woken only at the boundary where
a request finishes or where a waiting transfer has landed (see `rounds.RoundCost`).
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np

from .rounds import RoundCost

_INF = float("inf")


class _DecodeInstance:
    __slots__ = (
        "batch", "capacity", "epoch", "joiners", "link_free", "now", "peak", "pending", "pending_tokens",
        "reserved", "round", "running", "sum_context", "wake_rounds",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reserved = 0  # KV tokens committed to running and in-transfer requests
        self.peak = 0
        self.pending: deque[int] = deque()  # prefilled, waiting for room (KV still on the prefill side)
        self.pending_tokens = 0
        self.link_free = 0.0
        self.joiners: deque[tuple[float, int]] = deque()  # (transfer done, request), in done order
        self.running: list[tuple[int, int]] = []  # heap of (round it finishes after, request)
        self.batch = 0
        self.sum_context = 0
        self.round = 0  # rounds completed since the instance was created
        self.now = 0.0  # time of the last round boundary (or of the start of the current run)
        self.epoch = 0
        self.wake_rounds = 0


def simulate_decode(
    instances: int,
    capacity: int,
    cost: RoundCost,
    transfer_seconds_per_token: float,
    ready: np.ndarray,
    order: list[int],
    inputs: list[int],
    outputs: list[int],
    finish: np.ndarray,
) -> list[int]:
    """Fill `finish[j]` (time of the last token) for every request in `order` (sorted by `ready`).

    Returns the peak KV tokens reserved on each instance.
    """
    pool = [_DecodeInstance(capacity) for _ in range(instances)]
    events: list[tuple[float, int, int]] = []  # (time, instance, epoch)

    def schedule(d: int) -> None:
        inst = pool[d]
        inst.epoch += 1
        if inst.batch == 0:
            if inst.joiners:
                inst.wake_rounds = 0
                heapq.heappush(events, (inst.joiners[0][0], d, inst.epoch))
            return
        k = inst.running[0][0] - inst.round
        if inst.joiners:
            k_join = cost.rounds_until(inst.batch, inst.sum_context, inst.joiners[0][0] - inst.now)
            k = min(k, k_join)
        inst.wake_rounds = k
        heapq.heappush(events, (inst.now + cost.elapsed(inst.batch, inst.sum_context, k), d, inst.epoch))

    def pull(inst: _DecodeInstance, t: float) -> bool:
        pulled = False
        while inst.pending:
            j = inst.pending[0]
            need = inputs[j] + outputs[j]
            if inst.reserved + need > inst.capacity:
                break
            inst.pending.popleft()
            inst.pending_tokens -= need
            inst.reserved += need
            if inst.reserved > inst.peak:
                inst.peak = inst.reserved
            start = t if t > inst.link_free else inst.link_free
            inst.link_free = start + inputs[j] * transfer_seconds_per_token
            inst.joiners.append((inst.link_free, j))
            pulled = True
        return pulled

    def admit_landed(inst: _DecodeInstance, t: float) -> None:
        joiners = inst.joiners
        while joiners and joiners[0][0] <= t:
            _, j = joiners.popleft()
            heapq.heappush(inst.running, (inst.round + outputs[j] - 1, j))
            inst.batch += 1
            inst.sum_context += inputs[j] + 1

    def boundary(d: int, t: float) -> None:
        inst = pool[d]
        if inst.batch == 0:
            inst.now = t  # an idle instance starts its first round when the first transfer lands
        else:
            k = inst.wake_rounds
            inst.sum_context += k * inst.batch
            inst.round += k
            inst.now = t
            running = inst.running
            while running and running[0][0] == inst.round:
                _, j = heapq.heappop(running)
                finish[j] = t
                inst.batch -= 1
                fp = inputs[j] + outputs[j]
                inst.sum_context -= fp
                inst.reserved -= fp
            pull(inst, t)
        admit_landed(inst, t)
        schedule(d)

    n = len(order)
    ptr = 0
    while ptr < n or events:
        if ptr < n and (not events or ready[order[ptr]] < events[0][0]):
            j = order[ptr]
            ptr += 1
            t = float(ready[j])
            d = min(range(instances), key=lambda i: pool[i].reserved + pool[i].pending_tokens)
            inst = pool[d]
            inst.pending.append(j)
            inst.pending_tokens += inputs[j] + outputs[j]
            if pull(inst, t):
                schedule(d)  # a new transfer may land before the instance's current wake-up
            continue
        t, d, epoch = heapq.heappop(events)
        if epoch == pool[d].epoch:
            boundary(d, t)
    return [inst.peak for inst in pool]
