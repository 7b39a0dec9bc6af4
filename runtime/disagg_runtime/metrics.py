"""Prometheus metrics of the serving path, one CollectorRegistry per process (no global registry).

Names follow vLLM's where one exists, with the `disagg_` prefix; docs/metrics.md lists them and says
which process exports each. The operator re-plans from the router's request counter (arrival rate) and
its length histograms, so the bucket edges of those are part of the interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

Role = Literal["router", "prefill", "decode", "colocated"]
Outcome = Literal["ok", "error", "rejected", "invalid", "aborted"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "error", "rejected", "invalid", "aborted")

# Token-length buckets: fine where chat and code requests sit, doubling beyond (long-context summaries).
LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
                  12288, 16384, 32768, 65536, 131072)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0, 600.0)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of `registry` and its content type, for a /metrics handler."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request metrics, exported by the router (the one place every request passes exactly once)."""

    requests: Counter
    prompt_tokens: Histogram
    generation_tokens: Histogram
    ttft: Histogram
    tpot: Histogram
    e2e: Histogram
    in_flight: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RequestMetrics:
        requests = Counter("disagg_requests", "Requests finished, by outcome.", ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            requests.labels(outcome)  # export zeros so rate() works before the first error
        return cls(
            requests=requests,
            prompt_tokens=Histogram("disagg_request_prompt_tokens", "Prompt length of admitted requests, tokens.",
                                    buckets=LENGTH_BUCKETS, registry=registry),
            generation_tokens=Histogram("disagg_request_generation_tokens",
                                        "Tokens generated per finished request.", buckets=LENGTH_BUCKETS,
                                        registry=registry),
            ttft=Histogram("disagg_time_to_first_token_seconds", "Arrival at the router to first token sent.",
                           buckets=TTFT_BUCKETS, registry=registry),
            tpot=Histogram("disagg_time_per_output_token_seconds",
                           "Mean time between output tokens of one request (after the first).",
                           buckets=TPOT_BUCKETS, registry=registry),
            e2e=Histogram("disagg_e2e_request_latency_seconds", "Arrival to last token.", buckets=E2E_BUCKETS,
                          registry=registry),
            in_flight=Gauge("disagg_requests_in_flight", "Requests the router is serving now.",
                            registry=registry),
        )

    def finished(self, *, prompt_tokens: int, output_tokens: int, ttft: float, e2e: float) -> None:
        """Record a request that completed normally."""
        self.requests.labels("ok").inc()
        self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(output_tokens)
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if output_tokens > 1:
            self.tpot.observe((e2e - ttft) / (output_tokens - 1))

    def ended(self, outcome: Outcome) -> None:
        """Record a request that did not complete normally."""
        self.requests.labels(outcome).inc()


@dataclass(frozen=True)
class WorkerMetrics:
    """Queue, KV-cache and KV-transfer metrics of a prefill or decode worker (labelled by role)."""

    role: Role
    queue_depth: Gauge
    running: Gauge
    kv_blocks_used: Gauge
    kv_blocks_free: Gauge
    kv_transfer_bytes: Counter
    kv_transfer_seconds: Histogram
    step_seconds: Histogram
    batch_tokens: Histogram
    preemptions: Counter
    swapped_tokens: Counter
    recomputed_tokens: Counter
    preempted_requests: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry, role: Role) -> WorkerMetrics:
        metrics = cls._build(registry, role)
        for counter in (metrics.preemptions, metrics.swapped_tokens, metrics.recomputed_tokens):
            counter.labels(role)  # export zeros so rate() and the must-be-zero checks work from the start
        return metrics

    @classmethod
    def _build(cls, registry: CollectorRegistry, role: Role) -> WorkerMetrics:
        return cls(
            role=role,
            queue_depth=Gauge("disagg_queue_depth", "Requests waiting: prefill queue, or decode waiting for KV.",
                              ["role"], registry=registry),
            running=Gauge("disagg_running_requests", "Requests in the engine (prefill: holding parked KV).",
                          ["role"], registry=registry),
            kv_blocks_used=Gauge("disagg_kv_blocks_used", "KV-cache blocks in use.", ["role"], registry=registry),
            kv_blocks_free=Gauge("disagg_kv_blocks_free", "KV-cache blocks free.", ["role"], registry=registry),
            kv_transfer_bytes=Counter("disagg_kv_transfer_bytes", "KV bytes moved (on the wire).",
                                      ["role", "channel"], registry=registry),
            kv_transfer_seconds=Histogram("disagg_kv_transfer_seconds", "Time to move one request's KV.",
                                          ["role", "channel"], buckets=TRANSFER_BUCKETS, registry=registry),
            step_seconds=Histogram("disagg_engine_step_seconds", "One engine step (a prefill batch or a decode "
                                   "iteration).", ["role"], buckets=STEP_BUCKETS, registry=registry),
            batch_tokens=Histogram("disagg_engine_batch_tokens", "Tokens per engine step (prompt tokens for "
                                   "prefill, sequences for decode).", ["role"], buckets=LENGTH_BUCKETS,
                                   registry=registry),
            preemptions=Counter("disagg_preemptions", "Running requests preempted because a decode step could "
                                "not get KV blocks.", ["role"], registry=registry),
            swapped_tokens=Counter("disagg_preemption_swapped_tokens", "KV tokens swapped out to host memory "
                                   "by preemption.", ["role"], registry=registry),
            recomputed_tokens=Counter("disagg_preemption_recomputed_tokens", "Tokens prefilled again to "
                                      "rebuild the KV of preempted requests.", ["role"], registry=registry),
            preempted_requests=Gauge("disagg_preempted_requests", "Requests preempted and waiting to resume.", ["role"],
                            registry=registry),
        )

    def set_load(self, *, queued: int, running: int, blocks_used: int, blocks_free: int) -> None:
        self.queue_depth.labels(self.role).set(queued)
        self.running.labels(self.role).set(running)
        self.kv_blocks_used.labels(self.role).set(blocks_used)
        self.kv_blocks_free.labels(self.role).set(blocks_free)

    def set_preempted(self, n: int) -> None:
        self.preempted_requests.labels(self.role).set(n)

    def preempted(self, *, preemptions: int, swapped_tokens: int, recomputed_tokens: int) -> None:
        self.preemptions.labels(self.role).inc(preemptions)
        self.swapped_tokens.labels(self.role).inc(swapped_tokens)
        self.recomputed_tokens.labels(self.role).inc(recomputed_tokens)

    def transferred(self, *, channel: str, wire_bytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.labels(self.role, channel).inc(wire_bytes)
        self.kv_transfer_seconds.labels(self.role, channel).observe(seconds)

    def stepped(self, *, seconds: float, tokens: int) -> None:
        self.step_seconds.labels(self.role).observe(seconds)
        self.batch_tokens.labels(self.role).observe(tokens)
