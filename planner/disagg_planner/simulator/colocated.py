"""Colocated serving (the vLLM baseline): each replica runs prefill and decode on the same GPUs.

A replica's step is either a prefill batch or one decode round, never both. Prefill has priority (vLLM's
default scheduler before chunked prefill): at every round boundary, if the engine would admit the head of
the FCFS wait queue (its prompt's KV blocks fit with the watermark to spare and no preempted request
waits, `kv_blocks`), waiting prompts are prefilled together up to the token budget and memory; otherwise
every running request advances one token, growing into new blocks on demand; when they run out, the
newest is preempted (its swap or recompute cost added to the round) and resumes later. Decode therefore stalls
for every prefill batch, which is the interference disaggregation removes. Requests go to replicas
round-robin in arrival order, so replicas are independent and simulated one after another.

An engine that overlaps decode steps (`LatencyModel.overlaps_decode`, engine/overlap.py in the runtime)
launches each step when the step before ends, so what follows a step is chosen from the queue as it was
when that step started: a prompt arriving during a decode round is prefilled one round later than a
synchronous engine would. The colocated worker overlaps its prefills the same way (their first tokens stay
on the device for the next decode round to gather), so a prompt arriving during a prefill waits for the
decode round launched behind it, when one runs. A prefill launched while decodes run takes the served
profile's `prefillBehindDecodeS` more (its host work, timed from idle in the engine profile, partly hides
behind the decode step in flight, so on a GPU it is a credit), measured under load by the served profiler.

With pp > 1 a prefill batch crosses the stages alone (no overlap with decode micro-batches), and decode
rounds are micro-batched over the stages as in the disaggregated decode instances.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from ..latency import LatencyModel
from ..workloads import SimRequest
from .kv_blocks import BlockLedger, OnDemandBatch, preemption_costs
from .rounds import RoundCost
from .trace import Trace, as_trace, check_fits, instance_capacity
from .types import ColocatedConfig, SimResult


def simulate_colocated(cfg: ColocatedConfig, latency: LatencyModel, requests: Sequence[SimRequest] | Trace) -> SimResult:
    """Simulate `requests` on `cfg.shape.instances` colocated replicas; deterministic."""
    trace = as_trace(requests)
    shape = cfg.shape
    capacity = instance_capacity(latency, shape, cfg.mem_util, "colocated")
    if not trace.inputs:
        return SimResult([], [0] * shape.instances, capacity)
    footprints = [i + m - 1 for i, m in zip(trace.inputs, trace.limits, strict=True)]
    check_fits(footprints, capacity // cfg.kv.block_size * cfg.kv.block_size, "colocated", "prompt + max_tokens - 1")

    first = np.empty(len(trace.inputs))
    last = np.empty(len(trace.inputs))
    cost = RoundCost(latency, shape.tp, shape.pp, shape.stage_link_gbps)
    replica = _Replica(cfg, latency, cost, capacity, trace, first, last)
    batches = [replica.run(list(range(r, len(trace.inputs), shape.instances))) for r in range(shape.instances)]
    peaks = [b.ledger.peak * b.ledger.bs for b in batches]
    return trace.result(first, last, peaks, capacity, preemptions=sum(b.preemptions for b in batches),
                        preempted_tokens=sum(b.preempted_tokens for b in batches),
                        request_latency_s=latency.request_latency_s)


class _Replica:
    """Runs one replica's share of the trace, writing first/last token times."""

    def __init__(
        self,
        cfg: ColocatedConfig,
        latency: LatencyModel,
        cost: RoundCost,
        capacity: int,
        trace: Trace,
        first: np.ndarray,
        last: np.ndarray,
    ) -> None:
        self.tp, self.pp = cfg.shape.tp, cfg.shape.pp
        self.budget = cfg.prefill_token_budget
        self.latency = latency
        self.link = cfg.shape.stage_link_gbps or latency.intra_node_gbps
        self.hidden_bytes = latency.stage(self.tp, self.pp).hidden_bytes_per_token
        self.cost = cost
        self.capacity = capacity
        self.arrivals, self.inputs, self.outputs = trace.arrivals, trace.inputs, trace.outputs
        self.first, self.last = first, last
        self.policy = cfg.kv
        self.costs = preemption_costs(latency, self.tp, self.pp, self.link, cfg.kv)
        self.overlapped = latency.overlaps_decode(self.tp, self.pp)

    def prefill_step(self, tokens: int, batch: int, sum_sq: int, behind_decode: bool) -> float:
        stage = self.latency.prefill_stage_time(self.tp, self.pp, batch, tokens, sum_sq)
        step = LatencyModel.pipeline_latency(stage, self.pp, tokens * self.hidden_bytes, self.link)
        if behind_decode:
            # What serving adds to (or hides of) a prefill launched while decodes run; never more than half
            # of it hidden: the device time, most of a prefill at the lengths probed, cannot be.
            step = max(step + self.latency.prefill_behind_decode_s, 0.5 * step)
        return step

    def run(self, mine: list[int]) -> OnDemandBatch:
        """Simulate the requests `mine` (arrival order); returns the replica's final batch state."""
        inputs, outputs = self.inputs, self.outputs
        arrivals = [self.arrivals[j] for j in mine]
        first, last, cost, budget = self.first, self.last, self.cost, self.budget
        kv = OnDemandBatch(BlockLedger(self.capacity, self.policy), self.policy, *self.costs)
        ledger = kv.ledger
        waiting: deque[int] = deque()
        t = 0.0
        # Arrivals up to `seen` are in the queue the next step is chosen from. That is `t`, except right after
        # decode rounds on an overlapped engine: it launched the round it is now ending when the round before
        # ended, so it chose what follows when this round started.
        seen = 0.0
        ptr, m = 0, len(mine)
        while True:
            while ptr < m and arrivals[ptr] <= seen:
                waiting.append(mine[ptr])
                ptr += 1
            if waiting and kv.can_admit(inputs[waiting[0]]):
                members: list[int] = []
                tokens = sum_sq = blocks = 0
                while waiting:
                    j = waiting[0]
                    if members and tokens + inputs[j] > budget or not kv.can_admit(inputs[j], blocks):
                        break
                    waiting.popleft()
                    members.append(j)
                    tokens += inputs[j]
                    sum_sq += inputs[j] * inputs[j]
                    blocks += ledger.blocks(inputs[j])
                ledger.take(blocks)
                start = t
                t += self.prefill_step(tokens, len(members), sum_sq, behind_decode=bool(kv.batch))
                # Overlapped, the host chose what follows when it launched the prefill; else it waited for it.
                seen = start if self.overlapped else t
                for j in members:
                    first[j] = t
                    if outputs[j] == 1:
                        last[j] = t
                        ledger.give(ledger.blocks(inputs[j]))
                    else:
                        kv.join(j, inputs[j], outputs[j] - 1)
                continue
            if kv.batch or kv.num_preempted:
                t += kv.prepare_round()  # blocks for this round: preempt the newest or resume the oldest
                if not kv.batch:
                    seen = t
                    continue  # everything left is preempted and cannot resume yet
                k = min(kv.rounds_to_next_finish(), kv.rounds_until_short())
                if waiting and kv.can_admit(inputs[waiting[0]]):
                    k = 1  # resumes just cleared the way: the engine prefills right after this round
                elif not waiting and ptr < m:  # an arrival triggers a prefill at the next boundary after it
                    if self.overlapped and arrivals[ptr] <= t:
                        k = 1  # arrived during the round just launched ahead of it: that round runs first
                    else:  # overlapped, the boundary after the arrival has its next round launched already
                        k = min(k, cost.rounds_until(kv.batch, kv.sum_context, arrivals[ptr] - t) + self.overlapped)
                start = t
                t += cost.elapsed(kv.batch, kv.sum_context, k)
                seen = start + cost.elapsed(kv.batch, kv.sum_context, k - 1) if self.overlapped else t
                kv.advance_and_stamp(k, t, last)
                continue
            if ptr < m:
                t = max(t, arrivals[ptr])
                seen = t
                continue
            return kv
