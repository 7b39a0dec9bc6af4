"""Simulator inputs (instance shapes, configurations) and outputs (per-request latencies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np


class SimulationError(ValueError):
    """A configuration or trace the simulator cannot run."""


class ModelDoesNotFitError(SimulationError):
    """The model's weights (plus workspace) leave no KV memory on an instance of this shape."""


class RequestTooLargeError(SimulationError):
    """A request whose KV cache can never fit on the instance that must hold it."""


@dataclass(frozen=True)
class PhaseShape:
    """`instances` identical instances of tp x pp GPUs.

    `stage_link_gbps` is the bandwidth between pipeline stages (activation sends); None means the
    latency model's intra-node bandwidth.
    """

    tp: int
    pp: int
    instances: int
    stage_link_gbps: float | None = None

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.instances < 1:
            raise SimulationError(f"tp, pp and instances must be >= 1, got {self}")
        if self.stage_link_gbps is not None and self.stage_link_gbps <= 0:
            raise SimulationError(f"stage_link_gbps must be positive, got {self.stage_link_gbps}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.instances


@dataclass(frozen=True)
class KVPolicy:
    """How decode memory is managed: the runtime engine's on-demand blocks, watermark and preemption.

    `host_link_gbps` is each GPU's link to host memory (PCIe 4.0 x16: ~25 GB/s), which swaps cross.
    """

    block_size: int = 16
    watermark: float = 0.01
    preemption: Literal["swap", "recompute"] = "swap"
    host_link_gbps: float = 25.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SimulationError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 <= self.watermark < 1:
            raise SimulationError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.preemption not in ("swap", "recompute"):
            raise SimulationError(f"preemption must be swap or recompute, got {self.preemption!r}")
        if self.host_link_gbps <= 0:
            raise SimulationError(f"host_link_gbps must be positive, got {self.host_link_gbps}")


@dataclass(frozen=True)
class DisaggConfig:
    """Prefill and decode instances, the link KV moves over (GB/s), and the prefill batch token budget."""

    prefill: PhaseShape
    decode: PhaseShape
    kv_link_gbps: float
    prefill_token_budget: int = 4096
    mem_util: float = 0.9
    kv: KVPolicy = field(default_factory=KVPolicy)

    def __post_init__(self) -> None:
        if self.kv_link_gbps <= 0:
            raise SimulationError(f"kv_link_gbps must be positive, got {self.kv_link_gbps}")
        if self.prefill_token_budget < 1:
            raise SimulationError(f"prefill_token_budget must be >= 1, got {self.prefill_token_budget}")

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus


@dataclass(frozen=True)
class ColocatedConfig:
    """Replicas that each run both phases (continuous batching, prefill first), like vLLM."""

    shape: PhaseShape
    prefill_token_budget: int = 4096
    mem_util: float = 0.9
    kv: KVPolicy = field(default_factory=KVPolicy)

    def __post_init__(self) -> None:
        if self.prefill_token_budget < 1:
            raise SimulationError(f"prefill_token_budget must be >= 1, got {self.prefill_token_budget}")

    @property
    def gpus(self) -> int:
        return self.shape.gpus


@dataclass
class RequestResult:
    """Seconds. tpot = (e2e - ttft) / (output_len - 1), 0 for a single-token output."""

    ttft: float
    tpot: float
    e2e: float


class SimResult:
    """Per-request latencies in the trace's order, plus memory peaks (KV tokens) and preemptions.

    `peak_kv_tokens` is per decode (or colocated) instance, `kv_capacity_tokens` that of one such instance,
    `preemptions` and `preempted_tokens` (KV swapped out or dropped for recompute) are over all of them.
    A result built from arrays (`from_arrays`, what the simulators return) makes its `results` objects only
    when asked: the search reads the arrays alone, and one object per request costs as much as a tenth of a run.
    """

    def __init__(self, results: list[RequestResult], peak_kv_tokens: list[int] | None = None,
                 kv_capacity_tokens: int = 0, preemptions: int = 0, preempted_tokens: int = 0) -> None:
        self.__dict__["results"] = results  # what the cached_property below would otherwise build
        self.peak_kv_tokens = [] if peak_kv_tokens is None else peak_kv_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self.preemptions = preemptions
        self.preempted_tokens = preempted_tokens

    @classmethod
    def from_arrays(
        cls, ttft: np.ndarray, tpot: np.ndarray, e2e: np.ndarray, peak_kv_tokens: list[int], kv_capacity_tokens: int,
        preemptions: int = 0, preempted_tokens: int = 0,
    ) -> SimResult:
        out = cls.__new__(cls)
        out.peak_kv_tokens = peak_kv_tokens
        out.kv_capacity_tokens = kv_capacity_tokens
        out.preemptions = preemptions
        out.preempted_tokens = preempted_tokens
        out.__dict__["_arrays"] = (ttft, tpot, e2e)
        return out

    @cached_property
    def results(self) -> list[RequestResult]:
        ttft, tpot, e2e = self._arrays
        return [RequestResult(a, b, c) for a, b, c in zip(ttft.tolist(), tpot.tolist(), e2e.tolist(), strict=True)]

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arr = np.array([(r.ttft, r.tpot, r.e2e) for r in self.results], dtype=float).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    @property
    def num_requests(self) -> int:
        return len(self._arrays[0])

    @property
    def ttfts(self) -> np.ndarray:
        return self._arrays[0]

    @property
    def tpots(self) -> np.ndarray:
        return self._arrays[1]

    @property
    def e2es(self) -> np.ndarray:
        return self._arrays[2]

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        """Share of requests meeting BOTH objectives (seconds)."""
        if not self.num_requests:
            return 0.0
        ok = (self.ttfts <= ttft_slo) & (self.tpots <= tpot_slo)
        return float(np.count_nonzero(ok)) / self.num_requests

    @property
    def mean_ttft(self) -> float:
        return float(self.ttfts.mean())

    @property
    def p90_ttft(self) -> float:
        return float(np.percentile(self.ttfts, 90))

    @property
    def mean_tpot(self) -> float:
        return float(self.tpots.mean())

    @property
    def p90_tpot(self) -> float:
        return float(np.percentile(self.tpots, 90))

    @property
    def mean_e2e(self) -> float:
        return float(self.e2es.mean())
