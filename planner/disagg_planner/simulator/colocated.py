"""Colocated serving (the vLLM baseline): each replica runs prefill and decode on the same GPUs.

A replica's step is either a prefill batch or one decode round, never both. Prefill has priority (vLLM's
default scheduler before chunked prefill): at every round boundary, if the head of the FCFS wait queue
fits in KV memory (input + output tokens reserved), waiting prompts are prefilled together up to the
token budget and memory; otherwise every running request advances one token. Decode therefore stalls
for every prefill batch, which is the interference disaggregation removes. Requests go to replicas
round-robin in arrival order, so replicas are independent and simulated one after another.

With pp > 1 a prefill batch crosses the stages alone (no overlap with decode micro-batches), and decode
rounds are micro-batched over the stages as in the disaggregated decode instances.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

import numpy as np

from ..latency import LatencyModel
from ..workloads import SimRequest
from .rounds import RoundCost
from .trace import Trace, check_fits, instance_capacity
from .types import ColocatedConfig, SimResult


def simulate_colocated(cfg: ColocatedConfig, latency: LatencyModel, requests: Sequence[SimRequest]) -> SimResult:
    """Simulate `requests` on `cfg.shape.instances` colocated replicas; deterministic."""
    trace = Trace.of(requests)
    shape = cfg.shape
    capacity = instance_capacity(latency, shape, cfg.mem_util, "colocated")
    if not trace.inputs:
        return SimResult([], [0] * shape.instances, capacity)
    footprints = [i + o for i, o in zip(trace.inputs, trace.outputs, strict=True)]
    check_fits(footprints, capacity, "colocated", "prompt + output")

    first = np.empty(len(trace.inputs))
    last = np.empty(len(trace.inputs))
    cost = RoundCost(latency, shape.tp, shape.pp, shape.stage_link_gbps)
    replica = _Replica(cfg, latency, cost, capacity, trace, first, last)
    peaks = [replica.run(list(range(r, len(trace.inputs), shape.instances))) for r in range(shape.instances)]
    return trace.result(first, last, peaks, capacity)


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

    def prefill_step(self, tokens: int, batch: int, sum_sq: int) -> float:
        stage = self.latency.prefill_stage_time(self.tp, self.pp, batch, tokens, sum_sq)
        return LatencyModel.pipeline_latency(stage, self.pp, tokens * self.hidden_bytes, self.link)

    def run(self, mine: list[int]) -> int:
        """Simulate the requests `mine` (arrival order); returns the peak KV tokens reserved."""
        arrivals, inputs, outputs = self.arrivals, self.inputs, self.outputs
        first, last, cost, capacity, budget = self.first, self.last, self.cost, self.capacity, self.budget
        waiting: deque[int] = deque()
        running: list[tuple[int, int]] = []  # heap of (round it finishes after, request)
        batch = sum_context = rounds = reserved = peak = 0
        t = 0.0
        ptr, m = 0, len(mine)
        while True:
            while ptr < m and arrivals[mine[ptr]] <= t:
                waiting.append(mine[ptr])
                ptr += 1
            if waiting and reserved + inputs[waiting[0]] + outputs[waiting[0]] <= capacity:
                members: list[int] = []
                tokens = sum_sq = 0
                while waiting:
                    j = waiting[0]
                    need = inputs[j] + outputs[j]
                    if members and tokens + inputs[j] > budget or reserved + need > capacity:
                        break
                    waiting.popleft()
                    members.append(j)
                    tokens += inputs[j]
                    sum_sq += inputs[j] * inputs[j]
                    reserved += need
                peak = max(peak, reserved)
                t += self.prefill_step(tokens, len(members), sum_sq)
                for j in members:
                    first[j] = t
                    if outputs[j] == 1:
                        last[j] = t
                        reserved -= inputs[j] + 1
                    else:
                        heapq.heappush(running, (rounds + outputs[j] - 1, j))
                        batch += 1
                        sum_context += inputs[j] + 1
                continue
            if batch:
                k = running[0][0] - rounds
                if not waiting and ptr < m:  # an arrival triggers a prefill at the next boundary after it
                    k = min(k, cost.rounds_until(batch, sum_context, arrivals[mine[ptr]] - t))
                t += cost.elapsed(batch, sum_context, k)
                sum_context += k * batch
                rounds += k
                while running and running[0][0] == rounds:
                    _, j = heapq.heappop(running)
                    last[j] = t
                    batch -= 1
                    need = inputs[j] + outputs[j]
                    sum_context -= need
                    reserved -= need
                continue
            if ptr < m:
                t = max(t, arrivals[mine[ptr]])
                continue
            return peak
