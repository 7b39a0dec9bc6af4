"""A load generator whose workload changes mid-run: Poisson arrivals in phases, each with its own rate and
length ranges (a step in arrival rate, a shift from chat-like to long summarization-like prompts).

`PhasedLoad.start()` replays the trace in a background thread through the bench client
(`disagg_runtime.benchclient`: streamed completions, token-id prompts of exact lengths, `ignore_eos`),
so the caller can watch the operator meanwhile; `join()` returns one record per request with wall-clock
send times, to line requests up with plan changes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from disagg_planner.workloads import SimRequest
from disagg_runtime.benchclient.client import RequestRecord, run_trace


@dataclass(frozen=True)
class Phase:
    """`duration_s` of Poisson arrivals at `rate`, lengths uniform in [low, high)."""

    duration_s: float
    rate: float
    input_lengths: tuple[int, int] = (16, 48)
    output_lengths: tuple[int, int] = (16, 17)


def phased_trace(phases: list[Phase], seed: int = 0) -> list[SimRequest]:
    """Arrival times (seconds from the start) and lengths for the whole run."""
    rng = np.random.default_rng(seed)
    out: list[SimRequest] = []
    start = 0.0
    for p in phases:
        t = start + rng.exponential(1.0 / p.rate)
        while t < start + p.duration_s:
            out.append(SimRequest(arrival=float(t), input_len=int(rng.integers(*p.input_lengths)),
                                  output_len=int(rng.integers(*p.output_lengths))))
            t += rng.exponential(1.0 / p.rate)
        start += p.duration_s
    return out


@dataclass
class PhasedLoad:
    """Replays `phases` against `url` in a thread."""

    url: str
    phases: list[Phase]
    seed: int = 0
    timeout_s: float = 60.0
    t0: float = 0.0  # wall clock of the trace's time 0
    records: list[RequestRecord] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def phase_start(self, index: int) -> float:
        """Wall-clock time phase `index` begins."""
        return self.t0 + sum(p.duration_s for p in self.phases[:index])

    def start(self) -> PhasedLoad:
        trace = phased_trace(self.phases, self.seed)

        def main() -> None:
            try:
                self.t0 = time.time()
                self.records = asyncio.run(run_trace(self.url, trace, model=None, seed=self.seed,
                                                     timeout=self.timeout_s))
            except BaseException as exc:  # re-raised by join()
                self._error = exc

        self._thread = threading.Thread(target=main, name="phased-load", daemon=True)
        self._thread.start()
        while not self.t0 and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def join(self, timeout: float | None = None) -> list[RequestRecord]:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the load generator did not finish")
        if self._error is not None:
            raise self._error
        return self.records


def window_attainment(records: list[RequestRecord], t0: float, window_s: float, ttft_s: float,
                      tpot_s: float) -> list[tuple[float, float, int]]:
    """(window start, share of requests meeting both SLOs, requests) per window of send time."""
    by_window: dict[int, list[bool]] = {}
    for r in records:
        met = r.ok and r.ttft is not None and r.ttft <= ttft_s and (r.tpot or 0.0) <= tpot_s
        by_window.setdefault(int(r.sent // window_s), []).append(met)
    return [(t0 + k * window_s, sum(v) / len(v), len(v)) for k, v in sorted(by_window.items())]
