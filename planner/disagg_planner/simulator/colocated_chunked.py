"""Colocated serving with chunked prefill (Sarathi-Serve; vLLM's default scheduler today).

Each step carries one token for every running request plus chunks of waiting prompts, filling a token
budget: the decode tokens count against it first, then the prompt being prefilled continues, then new
prompts are admitted FCFS while the engine would admit them (kv_blocks: the prompt's KV blocks fit with the
watermark to spare and no preempted request waits). A prompt longer than what is left of the budget is
split over several steps; its first token comes with its last chunk. Running requests grow into new blocks
on demand; when a round cannot get them the newest is preempted (swap or recompute cost added to the step)
and resumes, oldest first, before anything new is admitted. A prompt's blocks are taken when it is
admitted, so a half-prefilled prompt is never the one that runs short. Decode therefore
never stalls for a whole prompt, only for one bounded mixed step, which is what lowers tail TPOT against
the prefill-priority scheduler (colocated.py), at the price of longer TTFT for long prompts.

With nothing to prefill, rounds are jumped in closed form as in colocated.py. Requests go to replicas
round-robin in arrival order. With pp > 1 a mixed step crosses the stages alone (no micro-batch overlap),
a conservative simplification.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..latency import LatencyModel
from ..latency.mixed import chunk_attention
from ..workloads import SimRequest
from .kv_blocks import BlockLedger, OnDemandBatch, preemption_costs
from .rounds import RoundCost
from .trace import Trace, as_trace, check_fits, instance_capacity
from .types import KVPolicy, PhaseShape, SimResult, SimulationError


@dataclass(frozen=True)
class ChunkedColocatedConfig:
    """Replicas running both phases in mixed steps of at most `chunk_token_budget` tokens."""

    shape: PhaseShape
    chunk_token_budget: int = 512
    mem_util: float = 0.9
    kv: KVPolicy = field(default_factory=KVPolicy)

    def __post_init__(self) -> None:
        if self.chunk_token_budget < 2:
            raise SimulationError(f"chunk_token_budget must be >= 2, got {self.chunk_token_budget}")

    @property
    def gpus(self) -> int:
        return self.shape.gpus


def simulate_colocated_chunked(
    cfg: ChunkedColocatedConfig, latency: LatencyModel, requests: Sequence[SimRequest]
) -> SimResult:
    """Simulate `requests` on `cfg.shape.instances` chunked-prefill colocated replicas; deterministic."""
    trace = as_trace(requests)
    shape = cfg.shape
    capacity = instance_capacity(latency, shape, cfg.mem_util, "colocated")
    if not trace.inputs:
        return SimResult([], [0] * shape.instances, capacity)
    footprints = [i + m - 1 for i, m in zip(trace.inputs, trace.limits, strict=True)]
    check_fits(footprints, capacity // cfg.kv.block_size * cfg.kv.block_size, "colocated", "prompt + max_tokens - 1")
    first = np.empty(len(trace.inputs))
    last = np.empty(len(trace.inputs))
    replica = _ChunkedReplica(cfg, latency, capacity, trace, first, last)
    batches = [replica.run(list(range(r, len(trace.inputs), shape.instances))) for r in range(shape.instances)]
    peaks = [b.ledger.peak * b.ledger.bs for b in batches]
    return trace.result(first, last, peaks, capacity, preemptions=sum(b.preemptions for b in batches),
                        preempted_tokens=sum(b.preempted_tokens for b in batches),
                        request_latency_s=latency.request_latency_s)


class _ChunkedReplica:
    """Runs one replica's share of the trace, writing first/last token times."""

    def __init__(self, cfg: ChunkedColocatedConfig, latency: LatencyModel, capacity: int, trace: Trace,
                 first: np.ndarray, last: np.ndarray) -> None:
        self.tp, self.pp = cfg.shape.tp, cfg.shape.pp
        self.budget = cfg.chunk_token_budget
        self.latency = latency
        self.link = cfg.shape.stage_link_gbps or latency.intra_node_gbps
        self.hidden_bytes = latency.stage(self.tp, self.pp).hidden_bytes_per_token
        self.cost = RoundCost(latency, self.tp, self.pp, cfg.shape.stage_link_gbps)
        self.capacity = capacity
        self.arrivals, self.inputs, self.outputs = trace.arrivals, trace.inputs, trace.outputs
        self.first, self.last = first, last
        self.policy = cfg.kv
        self.costs = preemption_costs(latency, self.tp, self.pp, self.link, cfg.kv)

    def run(self, mine: list[int]) -> OnDemandBatch:
        """Simulate the requests `mine` (arrival order); returns the replica's final batch state."""
        inputs, outputs = self.inputs, self.outputs
        arrivals = [self.arrivals[j] for j in mine]
        first, last, cost, budget = self.first, self.last, self.cost, self.budget
        kv = OnDemandBatch(BlockLedger(self.capacity, self.policy), self.policy, *self.costs)
        ledger = kv.ledger
        can_admit, advance_and_stamp, join = kv.can_admit, kv.advance_and_stamp, kv.join
        tp, pp, link, hidden_bytes = self.tp, self.pp, self.link, self.hidden_bytes
        mixed_stage_time, pipeline_latency = self.latency.mixed_stage_time, LatencyModel.pipeline_latency
        waiting: deque[int] = deque()  # arrived, not admitted
        prefilling: deque[list[int]] = deque()  # admitted: [request, prompt tokens done]
        pending = 0  # prompt tokens admitted and not yet prefilled
        t = 0.0
        ptr, m = 0, len(mine)
        while True:
            while ptr < m and arrivals[ptr] <= t:
                waiting.append(mine[ptr])
                ptr += 1
            left = budget - kv.batch
            while left > 0 and waiting and pending < left and can_admit(inputs[waiting[0]]):
                j = waiting.popleft()
                ledger.take(ledger.blocks(inputs[j]))
                pending += inputs[j]
                prefilling.append([j, 0])
            if prefilling and left > 0:
                if kv.batch or kv.num_preempted:
                    t += kv.prepare_round()  # this step's decode blocks: preempt the newest or resume the oldest
                left = budget - kv.batch
                chunks = tokens = attention = 0
                completed: list[int] = []
                for entry in prefilling:
                    if tokens >= left:
                        break
                    j, done = entry
                    take = min(inputs[j] - done, left - tokens)
                    attention += chunk_attention(done, take)
                    tokens += take
                    chunks += 1
                    entry[1] = done + take
                    if entry[1] == inputs[j]:
                        completed.append(j)
                pending -= tokens
                batch = kv.batch
                # One mixed step over the stages: decode tokens and chunks cross each boundary together.
                stage = mixed_stage_time(tp, pp, batch, kv.sum_context, chunks, tokens, attention)
                t += pipeline_latency(stage, pp, (batch + tokens) * hidden_bytes, link)
                for _ in completed:
                    prefilling.popleft()  # completed chunks are always the queue's head
                if batch:
                    advance_and_stamp(1, t, last)
                for j in completed:
                    first[j] = t
                    if outputs[j] == 1:
                        last[j] = t
                        ledger.give(ledger.blocks(inputs[j]))
                    else:
                        join(j, inputs[j], outputs[j] - 1)
                continue
            if kv.batch or kv.num_preempted:
                t += kv.prepare_round()
                if not kv.batch:
                    continue  # everything left is preempted and cannot resume yet
                k = min(kv.rounds_to_next_finish(), kv.rounds_until_short())
                if waiting and can_admit(inputs[waiting[0]]) or left <= 0 and (waiting or prefilling):
                    k = 1  # admission (or the budget) is decided again after one round
                elif not waiting and ptr < m:  # an arrival joins at the next step boundary after it
                    k = min(k, cost.rounds_until(kv.batch, kv.sum_context, arrivals[ptr] - t))
                t += cost.elapsed(kv.batch, kv.sum_context, k)
                advance_and_stamp(k, t, last)
                continue
            if ptr < m:
                t = max(t, arrivals[ptr])
                continue
            return kv
