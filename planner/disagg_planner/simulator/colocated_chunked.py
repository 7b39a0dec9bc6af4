"""Colocated serving with chunked prefill (Sarathi-Serve; vLLM's default scheduler today).

Each step carries one token for every running request plus chunks of waiting prompts, filling a token
budget: the decode tokens count against it first, then the prompt being prefilled continues, then new
prompts are admitted FCFS while their whole-life KV (input + output) fits. A prompt longer than what is left
of the budget is split over several steps; its first token comes with its last chunk. Decode therefore
never stalls for a whole prompt, only for one bounded mixed step, which is what lowers tail TPOT against
the prefill-priority scheduler (colocated.py), at the price of longer TTFT for long prompts.

With nothing to prefill, rounds are jumped in closed form as in colocated.py. Requests go to replicas
round-robin in arrival order. With pp > 1 a mixed step crosses the stages alone (no micro-batch overlap),
a conservative simplification.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..latency import LatencyModel
from ..latency.mixed import chunk_attention
from ..workloads import SimRequest
from .rounds import RoundCost
from .trace import Trace, check_fits, instance_capacity
from .types import PhaseShape, SimResult, SimulationError


@dataclass(frozen=True)
class ChunkedColocatedConfig:
    """Replicas running both phases in mixed steps of at most `chunk_token_budget` tokens."""

    shape: PhaseShape
    chunk_token_budget: int = 512
    mem_util: float = 0.9

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
    trace = Trace.of(requests)
    shape = cfg.shape
    capacity = instance_capacity(latency, shape, cfg.mem_util, "colocated")
    if not trace.inputs:
        return SimResult([], [0] * shape.instances, capacity)
    check_fits([i + o for i, o in zip(trace.inputs, trace.outputs, strict=True)], capacity, "colocated",
               "prompt + output")
    first = np.empty(len(trace.inputs))
    last = np.empty(len(trace.inputs))
    replica = _ChunkedReplica(cfg, latency, capacity, trace, first, last)
    peaks = [replica.run(list(range(r, len(trace.inputs), shape.instances))) for r in range(shape.instances)]
    return trace.result(first, last, peaks, capacity)


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

    def mixed_step(self, batch: int, sum_context: int, chunks: int, tokens: int, attention: int) -> float:
        stage = self.latency.mixed_stage_time(self.tp, self.pp, batch, sum_context, chunks, tokens, attention)
        return LatencyModel.pipeline_latency(stage, self.pp, (batch + tokens) * self.hidden_bytes, self.link)

    def run(self, mine: list[int]) -> int:
        """Simulate the requests `mine` (arrival order); returns the peak KV tokens reserved."""
        arrivals, inputs, outputs = self.arrivals, self.inputs, self.outputs
        first, last, cost, capacity, budget = self.first, self.last, self.cost, self.capacity, self.budget
        waiting: deque[int] = deque()  # arrived, not admitted
        prefilling: deque[list[int]] = deque()  # admitted: [request, prompt tokens done]
        running: list[tuple[int, int]] = []  # heap of (round it finishes after, request)
        batch = sum_context = rounds = reserved = peak = 0
        pending = 0  # prompt tokens admitted and not yet prefilled
        t = 0.0
        ptr, m = 0, len(mine)
        while True:
            while ptr < m and arrivals[mine[ptr]] <= t:
                waiting.append(mine[ptr])
                ptr += 1
            left = budget - batch
            while left > 0 and waiting and pending < left and \
                    reserved + inputs[waiting[0]] + outputs[waiting[0]] <= capacity:
                j = waiting.popleft()
                reserved += inputs[j] + outputs[j]
                pending += inputs[j]
                prefilling.append([j, 0])
            peak = max(peak, reserved)
            if prefilling and left > 0:
                chunks = tokens = attention = 0
                completed: list[int] = []
                for entry in prefilling:
                    if tokens == left:
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
                t += self.mixed_step(batch, sum_context, chunks, tokens, attention)
                for _ in completed:
                    prefilling.popleft()  # completed chunks are always the queue's head
                if batch:
                    sum_context += batch
                    rounds += 1
                    batch, sum_context, reserved = self._finish(running, rounds, t, batch, sum_context, reserved)
                for j in completed:
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
                if not waiting and ptr < m:  # an arrival joins at the next step boundary after it
                    k = min(k, cost.rounds_until(batch, sum_context, arrivals[mine[ptr]] - t))
                if left <= 0 and (waiting or prefilling):
                    k = 1  # the decode batch fills the budget: step once, then look again
                t += cost.elapsed(batch, sum_context, k)
                sum_context += k * batch
                rounds += k
                batch, sum_context, reserved = self._finish(running, rounds, t, batch, sum_context, reserved)
                continue
            if ptr < m:
                t = max(t, arrivals[mine[ptr]])
                continue
            return peak

    def _finish(self, running: list[tuple[int, int]], rounds: int, t: float, batch: int, sum_context: int,
                reserved: int) -> tuple[int, int, int]:
        """Retire the requests whose last round was `rounds`."""
        while running and running[0][0] == rounds:
            _, j = heapq.heappop(running)
            self.last[j] = t
            batch -= 1
            need = self.inputs[j] + self.outputs[j]
            sum_context -= need
            reserved -= need
        return batch, sum_context, reserved
