"""Closed-form decode rounds: how long k rounds take while a batch stays fixed.

One round gives every running sequence one token. With a batch of B sequences whose contexts sum to S,
a round takes base(B) + slope·S, and each round adds B to S. So k rounds take
    k·base + slope·(k·S + B·k(k-1)/2),
which lets the simulators jump from one batch change to the next instead of looping per token.
"""

from __future__ import annotations

import math

from ..latency import LatencyModel


class RoundCost:
    """Round times of one decode (or colocated) instance shape, with base(B) cached per batch size.

    With pp stages the runtime cuts a round into M = min(pp, B) micro-batches of ceil(B/M) sequences that
    follow each other through the stages (disagg_runtime.parallel.pipeline): a round lasts M + pp - 1
    stage-times of one micro-batch plus pp-1 activation sends (`LatencyModel.pipelined_step`). The
    per-context part follows the same count: (M + pp - 1) / M of one stage's slope, taken at M = pp.
    """

    __slots__ = ("_base", "_latency", "_link", "pp", "slope", "tp")

    def __init__(self, latency: LatencyModel, tp: int, pp: int, stage_link_gbps: float | None) -> None:
        self._latency = latency
        self.tp, self.pp = tp, pp
        self._link = stage_link_gbps or latency.intra_node_gbps
        self._base: list[float] = [0.0]
        _, per_context = latency.decode_coefficients(tp, pp, 1)
        self.slope = per_context * (2 * pp - 1) / pp

    def base(self, batch: int) -> float:
        cache = self._base
        while len(cache) <= batch:
            b = len(cache)
            parts = LatencyModel.micro_batches(self.pp, b)
            micro = -(-b // parts)
            stage_base, _ = self._latency.decode_coefficients(self.tp, self.pp, micro)
            act = micro * self._latency.stage(self.tp, self.pp).hidden_bytes_per_token
            cache.append(LatencyModel.pipelined_step(stage_base, self.pp, parts, act, self._link))
        return cache[batch]

    def elapsed(self, batch: int, sum_context: int, rounds: int) -> float:
        """Seconds for `rounds` rounds starting from (batch, sum_context)."""
        cache = self._base
        base = cache[batch] if batch < len(cache) else self.base(batch)
        return rounds * base + self.slope * (rounds * sum_context + batch * rounds * (rounds - 1) / 2)

    def rounds_until(self, batch: int, sum_context: int, seconds: float) -> int:
        """Fewest rounds (>= 1) whose total time reaches `seconds`."""
        if seconds <= 0:
            return 1
        base, slope = self.base(batch), self.slope
        a = slope * batch / 2
        b = base + slope * sum_context - a
        if a <= 0:
            k = math.ceil(seconds / b) if b > 0 else 1
        else:
            k = math.ceil((-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a))
        k = max(k, 1)
        # The float solution can be off by one either way at the boundary; settle it exactly (by `elapsed`'s
        # arithmetic, written out here because this runs at every decode wake-up).
        while k > 1 and (k - 1) * base + slope * ((k - 1) * sum_context + batch * (k - 1) * (k - 2) / 2) >= seconds:
            k -= 1
        while k * base + slope * (k * sum_context + batch * k * (k - 1) / 2) < seconds:
            k += 1
        return k
