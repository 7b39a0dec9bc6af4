"""Decode instances: pull-based KV admission, on-demand KV blocks with preemption, continuous batching.

A request whose prefill finished is assigned to the decode instance with the least KV committed (in use
plus waiting), and waits there FCFS. The instance pulls the head's KV when the engine would admit it: its
prompt's blocks fit with the watermark to spare and no preempted request waits (`kv_blocks`); meanwhile
the KV stays in prefill memory (the paper's pull model). The prompt's blocks are reserved when the pull
starts. Transfers on one instance's link run one after another. A transferred request joins the running
batch at the next round boundary (on an engine that overlaps decode rounds, the one after: the round
in flight was launched without it); every round gives each running request one token and the blocks it
grows into; when they run out, the newest is preempted (swap or recompute, its cost added to the round)
and resumes later. A request leaves after output_len - 1 rounds of decoding (its first token came from
prefill).

Between batch changes the instance runs rounds back to back, so it is woken only at the boundary where
a request finishes, where a waiting transfer has landed, or where memory runs short (see
`rounds.RoundCost` and `kv_blocks.BlockLedger`).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

import numpy as np

from .kv_blocks import BlockLedger, OnDemandBatch
from .rounds import RoundCost
from .types import KVPolicy


class _DecodeInstance:
    __slots__ = ("epoch", "joiners", "kv", "ledger", "link_free", "now", "pending", "pending_tokens", "wake_rounds")

    def __init__(self, kv: OnDemandBatch) -> None:
        self.kv = kv
        self.ledger = kv.ledger
        self.pending: deque[int] = deque()  # prefilled, waiting for room (KV still on the prefill side)
        self.pending_tokens = 0
        self.link_free = 0.0
        self.joiners: deque[tuple[float, int]] = deque()  # (transfer done, request), in done order
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
    policy: KVPolicy | None = None,
    costs: tuple[Callable[[int], float], Callable[[int], float]] = (lambda _t: 0.0, lambda _t: 0.0),
    overlapped: bool = False,
) -> list[OnDemandBatch]:
    """Fill `finish[j]` (time of the last token) for every request in `order` (sorted by `ready`).

    `costs` are the (preempt, resume) seconds of a sequence by its cached tokens. Returns each
    instance's batch state (its ledger holds the peak blocks; it counts the preemptions). `overlapped`:
    the engine launches each round when the round before ends, so a transfer joins at a boundary only if
    it landed before the round ending there started (else one round later).
    """
    policy = policy or KVPolicy()
    pool = [_DecodeInstance(OnDemandBatch(BlockLedger(capacity, policy), policy, *costs)) for _ in range(instances)]
    events: list[tuple[float, int, int]] = []  # (time, instance, epoch)
    bs = policy.block_size

    def schedule(d: int) -> None:
        inst = pool[d]
        kv = inst.kv
        inst.epoch += 1
        if kv.batch == 0:
            if inst.joiners:
                inst.wake_rounds = 0
                heapq.heappush(events, (max(inst.joiners[0][0], inst.now), d, inst.epoch))
            return
        k = kv.rounds_to_next_finish()
        short = kv.rounds_until_short()
        if short < k:
            k = short
        if inst.joiners:
            landing = cost.rounds_until(kv.batch, kv.sum_context, inst.joiners[0][0] - inst.now)
            if landing < k:
                k = landing
        inst.wake_rounds = k
        heapq.heappush(events, (inst.now + cost.elapsed(kv.batch, kv.sum_context, k), d, inst.epoch))

    def pull(inst: _DecodeInstance, t: float) -> bool:
        pending = inst.pending
        if not pending:
            return False
        pulled = False
        kv = inst.kv
        ledger, can_admit = kv.ledger, kv.can_admit
        while pending:
            j = pending[0]
            prompt = inputs[j]
            if not can_admit(prompt):
                break
            pending.popleft()
            inst.pending_tokens -= prompt + outputs[j]
            ledger.take(-(-prompt // bs))  # its prompt's blocks, reserved for the pull
            start = t if t > inst.link_free else inst.link_free
            inst.link_free = start + prompt * transfer_seconds_per_token
            inst.joiners.append((inst.link_free, j))
            pulled = True
        return pulled

    def admit_landed(inst: _DecodeInstance, t: float) -> None:
        joiners = inst.joiners
        if joiners and joiners[0][0] <= t:
            join = inst.kv.join
            while joiners and joiners[0][0] <= t:
                _, j = joiners.popleft()
                join(j, inputs[j], outputs[j] - 1)

    def boundary(d: int, t: float) -> None:
        inst = pool[d]
        kv = inst.kv
        seen = t
        if kv.batch:
            if overlapped:  # the round ending at t was launched when the one before ended
                seen = inst.now + cost.elapsed(kv.batch, kv.sum_context, max(inst.wake_rounds - 1, 0))
            kv.advance_and_stamp(inst.wake_rounds, t, finish)
        inst.now = t  # an idle instance starts its first round when the first transfer lands
        pull(inst, t)
        admit_landed(inst, seen)
        if kv.batch or kv.num_preempted:
            inst.now += kv.prepare_round()  # blocks for the coming round: preempt or resume
            if kv.num_preempted == 0:
                pull(inst, inst.now)
        schedule(d)

    def committed(d: int) -> int:
        """KV tokens in use or waiting for a pull on instance d: what assignment balances."""
        inst = pool[d]
        return inst.ledger.used * bs + inst.pending_tokens

    # (committed, instance) entries: one is pushed whenever an instance's committed tokens may have changed
    # (only an assignment to it and its own boundaries change them), and stale ones are dropped when they
    # reach the top, so the least committed instance, the first of equals, costs O(log instances), not a scan.
    least: list[tuple[int, int]] = [(0, d) for d in range(instances)]
    times = ready.tolist()
    n = len(order)
    ptr = 0
    while ptr < n or events:
        if ptr < n and (not events or times[order[ptr]] < events[0][0]):
            j = order[ptr]
            ptr += 1
            t = times[j]
            while least[0][0] != committed(least[0][1]):
                heapq.heappop(least)
            d = least[0][1]
            inst = pool[d]
            inst.pending.append(j)
            inst.pending_tokens += inputs[j] + outputs[j]
            if pull(inst, t):
                schedule(d)  # a new transfer may land before the instance's current wake-up
            heapq.heappush(least, (committed(d), d))
            continue
        t, d, epoch = heapq.heappop(events)
        if epoch == pool[d].epoch:
            boundary(d, t)
            heapq.heappush(least, (committed(d), d))
    return [inst.kv for inst in pool]
