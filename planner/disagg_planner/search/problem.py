"""What every search task needs, in one picklable value that worker processes receive with each task."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..api.spec import DisaggServingSpec
from ..latency import LatencyModel
from ..simulator import SimResult
from ..simulator.trace import Trace
from ..workloads import clip_requests, sample_requests
from .capacity import LengthStats

# Simulated horizon, in request lifetimes (the latency the SLOs allow a mean request): a run shorter than
# a few lifetimes never leaves the empty-system start-up, and an overloaded configuration looks fine.
# Each request costs ~10 us to simulate, so runs are also clamped to a request count.
INSTANCE_LIFETIMES = 3
SYSTEM_LIFETIMES = 5
MIN_REQUESTS = 1000
MAX_INSTANCE_REQUESTS = 3000
MIN_SYSTEM_REQUESTS = 2000
MAX_SYSTEM_REQUESTS = 12000
# Requests arriving in the first part of a run meet an empty system; they are left out of attainment.
WARMUP_SHARE = 0.2
# Usable share of GPU memory, as the runtime configures its KV cache.
MEM_UTIL = 0.9
# An isolated decode simulation stands in an "ideal" KV link: transfers take no time.
IDEAL_LINK_GBPS = 1e9


@dataclass(frozen=True)
class SearchProblem:
    """The model, the SLOs and one unit-rate request sample; rates are applied by scaling arrival times.

    The sample is kept as arrays (not SimRequest objects) so that shipping the problem to a worker
    process with every task costs a memory copy, not the pickling of 20,000 objects.
    """

    latency: LatencyModel
    arrivals: np.ndarray  # Poisson at 1 req/s
    inputs: np.ndarray  # clipped to the model's context
    outputs: np.ndarray
    ttft_s: float
    tpot_s: float
    target: float  # attainment, e.g. 0.9
    target_rate: float  # req/s the plan is made for
    token_budget: int
    # Links in the planner's one unit, GB/s = 10^9 bytes/s (the spec's bandwidths, converted).
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int
    rel_tol: float = 0.03
    limits: np.ndarray | None = None  # max_tokens per request, when the workload gives them

    @classmethod
    def of(cls, spec: DisaggServingSpec, latency: LatencyModel, seed: int, rel_tol: float = 0.03) -> SearchProblem:
        sample = clip_requests(sample_requests(spec.workload, 1.0, MAX_SYSTEM_REQUESTS, seed),
                               latency.model.max_context)
        return cls(
            latency=latency,
            arrivals=np.array([r.arrival for r in sample]),
            inputs=np.array([r.input_len for r in sample], dtype=np.int64),
            outputs=np.array([r.output_len for r in sample], dtype=np.int64),
            limits=None if spec.workload.max_tokens_lengths is None
            else np.array([r.max_tokens for r in sample], dtype=np.int64),
            ttft_s=spec.slo.ttft_ms / 1000,
            tpot_s=spec.slo.tpot_ms / 1000,
            target=spec.slo.attainment,
            target_rate=spec.workload.rate,
            token_budget=spec.runtime.prefill_token_budget,
            intra_node_gbps=spec.cluster.intra_node_gb_per_s,
            inter_node_gbps=spec.cluster.inter_node_gb_per_s,
            gpus_per_node=spec.cluster.gpus_per_node,
            rel_tol=rel_tol,
        )

    @cached_property
    def stats(self) -> LengthStats:
        n = MIN_REQUESTS
        return LengthStats.of(self.inputs[:n].astype(float), self.outputs[:n].astype(float))

    @property
    def lifetime_s(self) -> float:
        """Latency the SLOs allow a mean request: TTFT plus its mean output at the TPOT limit."""
        return self.ttft_s + self.stats.mean_output * self.tpot_s

    def instance_requests(self, rate_bound: float, lifetime_s: float) -> int:
        """Requests for a single-instance run at rates up to `rate_bound`, each spending `lifetime_s` in it."""
        want = math.ceil(rate_bound * INSTANCE_LIFETIMES * lifetime_s)
        return min(MAX_INSTANCE_REQUESTS, max(MIN_REQUESTS, want))

    def system_requests(self, rate_bound: float) -> int:
        """Requests for a whole-system run whose rate cannot exceed `rate_bound`."""
        want = math.ceil(rate_bound * SYSTEM_LIFETIMES * self.lifetime_s)
        return min(MAX_SYSTEM_REQUESTS, max(MIN_SYSTEM_REQUESTS, want))

    def stage_link(self, gpus_together: int) -> float:
        """Bandwidth between pipeline stages of a group of `gpus_together` GPUs: NVLink if it fits a node."""
        return self.intra_node_gbps if gpus_together <= self.gpus_per_node else self.inter_node_gbps

    def at_rate(self, rate: float, count: int, first_token_only: bool = False) -> Trace:
        """The first `count` requests of the sample arriving at `rate` req/s (same lengths, same order).

        `first_token_only` cuts every output to one token: a prefill-only run with no decode work.
        """
        inputs = self.inputs[:count]
        if first_token_only:
            return Trace.of_arrays(self.arrivals[:count] / rate, inputs, np.ones_like(inputs))
        limits = None if self.limits is None else self.limits[:count]
        return Trace.of_arrays(self.arrivals[:count] / rate, inputs, self.outputs[:count], limits)

    def attainment(self, result: SimResult, ttft_s: float | None = None, tpot_s: float | None = None) -> float:
        """Steady-state attainment: the share after the warm-up requests meeting both SLOs (None: this SLO)."""
        skip = int(result.num_requests * WARMUP_SHARE)
        ttft = self.ttft_s if ttft_s is None else ttft_s
        tpot = self.tpot_s if tpot_s is None else tpot_s
        ok = (result.ttfts[skip:] <= ttft) & (result.tpots[skip:] <= tpot)
        return float(np.count_nonzero(ok)) / max(len(ok), 1)
