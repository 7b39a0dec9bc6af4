"""Telemetry against a REAL Prometheus scraping the runtime's REAL router metrics.

Three exporters stand in for three routers: `alpha` in namespace `prod` (5 req/s, prompt 100, output
20 tokens), `beta` in `prod` (2 req/s, 1000/300 tokens) and `alpha` in `staging` (2 req/s, prompts of
200000 tokens, beyond the last finite bucket). Target labels stand in for the pod-label relabelling
of a Kubernetes scrape job. After ~8 s of driven traffic at 1 s scrapes, `PrometheusTelemetry` must read
each one back on its own: rate within 20 %, lengths in the bins of the driven lengths.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from disagg_operator.telemetry import (
    DriftDetector,
    MetricNames,
    PrometheusTelemetry,
    ScrapeLabels,
    replan_tick,
    telemetry_for,
)
from disagg_planner.api import DisaggServingSpec
from prometheus_client import CollectorRegistry, start_http_server

from .prometheus import PrometheusServer, ScrapeTarget, free_port, prometheus_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None,
                       reason="needs the prometheus binary (/usr/bin/prometheus: apt install prometheus)"),
]

metrics = pytest.importorskip("disagg_runtime.metrics", reason="the runtime's metrics module defines the series")

DRIVE_S = 8.0
LABELS = ScrapeLabels()


@dataclass(frozen=True)
class Router:
    """One exporter: who it is, and the traffic driven through it."""

    instance: str
    namespace: str
    rate: float
    prompt: int
    output: int


ROUTERS = (Router("alpha", "prod", 5.0, 100, 20), Router("beta", "prod", 2.0, 1000, 300),
           Router("alpha", "staging", 2.0, 200_000, 600))


@dataclass(frozen=True)
class Driven:
    prom: PrometheusServer
    first_scrape: float  # when every target had been scraped once (their series exist from about then)
    t0: float
    t_end: float
    sent: dict[Router, int]


def _drive(recorders: dict[Router, metrics.RequestMetrics]) -> tuple[float, float, dict[Router, int]]:
    """Send each router's requests at fixed intervals for DRIVE_S seconds (wall clock)."""
    schedule = sorted(((i / r.rate, r) for r in ROUTERS for i in range(int(DRIVE_S * r.rate))), key=lambda e: e[0])
    sent = dict.fromkeys(ROUTERS, 0)
    t0 = time.time()
    for offset, router in schedule:
        delay = t0 + offset - time.time()
        if delay > 0:
            time.sleep(delay)
        recorders[router].finished(prompt_tokens=router.prompt, output_tokens=router.output, ttft=0.05, e2e=0.5)
        sent[router] += 1
    return t0, t0 + DRIVE_S, sent


@pytest.fixture(scope="module")
def driven() -> Iterator[Driven]:
    recorders, servers, targets = {}, [], []
    for router in ROUTERS:
        registry = CollectorRegistry()
        recorders[router] = metrics.RequestMetrics.create(registry)
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        servers.append(server)
        targets.append(ScrapeTarget(f"127.0.0.1:{port}",
                                    {LABELS.instance: router.instance, LABELS.namespace: router.namespace}))
    prom = PrometheusServer(targets)
    try:
        prom.start()
        first = prom.wait_for_scrapes(1)
        prom.wait_for_scrapes(1)  # the zeros are in twice: increase() sees the first requests
        t0, t_end, sent = _drive(recorders)
        while prom.wait_for_scrapes(1) < t_end:  # a scrape after the last request
            pass
        yield Driven(prom, first, t0, t_end, sent)
    finally:
        prom.stop()
        for server in servers:
            server.shutdown()
            server.server_close()


def _telemetry(driven: Driven, router: Router, window_s: float = DRIVE_S) -> PrometheusTelemetry:
    return PrometheusTelemetry(driven.prom.url, window_s, instance=router.instance, namespace=router.namespace)


async def test_reads_back_rate_and_length_bins(driven: Driven) -> None:
    router = ROUTERS[0]
    obs = await _telemetry(driven, router).observe(at=driven.t_end)
    assert obs.series_found
    assert obs.covered_s == pytest.approx(DRIVE_S)
    assert obs.rate_rps == pytest.approx(router.rate, rel=0.2)
    assert obs.requests == pytest.approx(driven.sent[router], rel=0.2)
    # 100 tokens fall in bucket (64, 128] = bin [65, 129); 20 in (16, 32] = [17, 33).
    assert obs.input_lengths is not None and obs.output_lengths is not None
    assert obs.input_mean == pytest.approx((65 + 128) / 2)
    assert obs.output_mean == pytest.approx((17 + 32) / 2)
    assert obs.input_overflow == 0 and obs.output_overflow == 0
    assert not obs.notes


async def test_series_of_other_resources_do_not_mix(driven: Driven) -> None:
    beta = await _telemetry(driven, ROUTERS[1]).observe(at=driven.t_end)
    assert beta.rate_rps == pytest.approx(ROUTERS[1].rate, rel=0.2)
    assert beta.input_mean == pytest.approx((769 + 1024) / 2)  # 1000 in (768, 1024]
    assert beta.output_mean == pytest.approx((257 + 384) / 2)  # 300 in (256, 384]
    nobody = await PrometheusTelemetry(driven.prom.url, DRIVE_S, instance="gamma", namespace="prod").observe(
        at=driven.t_end)
    assert not nobody.series_found and nobody.requests == 0 and nobody.input_lengths is None
    assert "no disagg_requests_total series" in nobody.notes[-1]


async def test_lengths_beyond_the_last_bucket_land_in_the_last_bin(driven: Driven) -> None:
    router = ROUTERS[2]
    obs = await _telemetry(driven, router).observe(at=driven.t_end)
    last = metrics.LENGTH_BUCKETS[-1]
    assert obs.input_lengths is not None
    assert obs.input_lengths.edges[-1] == last + 1
    assert obs.input_lengths.counts[-1] == pytest.approx(sum(obs.input_lengths.counts))
    assert obs.input_overflow == pytest.approx(driven.sent[router], rel=0.2)
    assert any(f"above the last finite bucket ({last})" in note for note in obs.notes)


async def test_a_deployment_younger_than_the_window_is_measured_over_its_age(driven: Driven) -> None:
    obs = await _telemetry(driven, ROUTERS[0], window_s=600).observe(at=driven.t_end)
    age = driven.t_end - driven.first_scrape  # each target's first scrape is within a second before it
    assert obs.covered_s == pytest.approx(age, abs=1.5)
    assert obs.covered_s < 60
    assert obs.rate_rps == pytest.approx(obs.requests / obs.covered_s)
    assert obs.requests == pytest.approx(driven.sent[ROUTERS[0]], rel=0.2)


async def test_replan_tick_confirms_drift_from_live_metrics(driven: Driven) -> None:
    spec = DisaggServingSpec.model_validate({
        "model": {"preset": "tiny-llama"}, "cluster": {"nodes": 1, "gpusPerNode": 2, "gpuType": "CPU"},
        "workload": {"rate": 2.0, "dataset": "code"}, "slo": {"ttftMs": 500, "tpotMs": 100},
        "replan": {"enabled": True, "windowSeconds": 30, "stableIntervals": 1},
    })
    telemetry = telemetry_for(spec, "alpha", "prod", default_url=driven.prom.url, names=MetricNames())
    decision = await replan_tick(spec, {}, telemetry, DriftDetector.from_spec(spec.replan, min_requests=20),
                                 now=driven.t_end)
    assert decision.replan, decision.status.message
    assert decision.event is not None and decision.event.reason == "WorkloadDrift"
    assert "arrival rate" in decision.event.message
    observed = decision.status.observed_workload
    assert observed is not None and observed.input_lengths is not None
    assert observed.input_lengths.edges == [65, 129]  # trimmed to the one bin that saw traffic
