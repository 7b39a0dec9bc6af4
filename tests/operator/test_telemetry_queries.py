"""PrometheusTelemetry against a canned Prometheus HTTP API: queries, arithmetic, errors, no blocking."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from disagg_operator.telemetry import (
    MetricNames,
    PrometheusTelemetry,
    PrometheusUnavailable,
    PromQueries,
    ScrapeLabels,
    TelemetryConfigError,
    TelemetryQueryError,
)
from disagg_planner.api import LengthHistogram

AT = 1_700_000_000.0


@dataclass
class CannedPrometheus:
    """Answers /api/v1/query from a table of (query substring -> vector); records what was asked."""

    answers: dict[str, list[dict]] = field(default_factory=dict)
    status: int = 200
    delay_s: float = 0.0
    asked: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def respond(self, params: dict[str, str]) -> tuple[int, dict]:
        self.asked.append(params)
        time.sleep(self.delay_s)
        if self.status != 200:
            return self.status, {"status": "error", "errorType": "bad_data", "error": "parse error"}
        result = next((v for k, v in self.answers.items() if k in params["query"]), [])
        return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.fixture
def prom() -> Iterator[CannedPrometheus]:
    canned = CannedPrometheus()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            params = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
            code, body = canned.respond(params)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    canned.url = f"http://127.0.0.1:{server.server_port}"
    yield canned
    server.shutdown()
    server.server_close()


def _sample(value: float, **labels: str) -> dict:
    return {"metric": labels, "value": [AT, str(value)]}


def _buckets(*pairs: tuple[str, float]) -> list[dict]:
    return [_sample(v, le=le) for le, v in pairs]


def test_queries_select_one_resource_and_count_demand_only() -> None:
    q = PromQueries.build({"app_kubernetes_io_instance": "llm", "namespace": "prod"}, 600, MetricNames())
    sel = '{app_kubernetes_io_instance="llm",namespace="prod"'
    assert q.arrivals == f'sum(increase(disagg_requests_total{sel},outcome=~"ok|error|rejected|aborted"}}[600000ms]))'
    assert q.prompt_buckets == f"sum by (le) (increase(disagg_request_prompt_tokens_bucket{sel}}}[600000ms]))"
    assert q.generation_buckets.startswith("sum by (le) (increase(disagg_request_generation_tokens_bucket{")
    # the age subquery looks back past the window, in steps of window/200
    assert q.first_seen == f"min(min_over_time(timestamp(disagg_requests_total{sel}}})[723000ms:3000ms]))"
    odd = PromQueries.build({"namespace": 'a"b\\c'}, 30, MetricNames())
    assert 'namespace="a\\"b\\\\c"' in odd.arrivals


async def test_rate_is_arrivals_over_the_part_of_the_window_with_data(prom: CannedPrometheus) -> None:
    prom.answers = {
        "sum(increase(disagg_requests_total": [_sample(300.0)],
        "min(min_over_time": [_sample(AT - 100.0)],  # the router appeared 100 s ago
        "prompt_tokens_bucket": _buckets(("64.0", 0), ("128.0", 300), ("+Inf", 300)),
        "generation_tokens_bucket": _buckets(("16.0", 100), ("32.0", 250), ("+Inf", 280)),
    }
    telemetry = PrometheusTelemetry(prom.url, 600, instance="llm", namespace="prod")
    obs = await telemetry.observe(at=AT)
    assert obs.covered_s == pytest.approx(100.0)
    assert obs.rate_rps == pytest.approx(3.0)
    assert obs.requests == 300
    assert obs.input_lengths == LengthHistogram(edges=[1, 65, 129], counts=[0, 300])
    assert obs.output_lengths == LengthHistogram(edges=[1, 17, 33], counts=[100, 180])
    assert obs.output_overflow == 30
    assert any("series exist for 100 s of the 600 s window" in n for n in obs.notes)
    assert any("30 of 280 lengths were above the last finite bucket (32)" in n for n in obs.notes)
    assert {p["time"] for p in prom.asked} == {f"{AT:.3f}"}  # one instant for all four queries
    assert all('app_kubernetes_io_instance="llm"' in p["query"] for p in prom.asked)


async def test_an_old_deployment_is_measured_over_the_whole_window(prom: CannedPrometheus) -> None:
    prom.answers = {"sum(increase(disagg_requests_total": [_sample(1200.0)],
                    "min(min_over_time": [_sample(AT - 700.0)]}
    obs = await PrometheusTelemetry(prom.url, 600, instance="llm", namespace="prod").observe(at=AT)
    assert obs.covered_s == 600 and obs.rate_rps == pytest.approx(2.0)
    assert obs.input_lengths is None and obs.series_found and not obs.notes


async def test_no_series_is_reported_not_raised(prom: CannedPrometheus) -> None:
    obs = await PrometheusTelemetry(prom.url, 600, instance="llm", namespace="prod").observe(at=AT)
    assert not obs.series_found and obs.rate_rps == 0 and obs.covered_s == 0
    assert 'no disagg_requests_total series matches {app_kubernetes_io_instance="llm",namespace="prod"}' in obs.notes[0]


async def test_custom_scrape_labels_are_used(prom: CannedPrometheus) -> None:
    telemetry = PrometheusTelemetry(prom.url, 60, instance="llm", namespace="prod",
                                    labels=ScrapeLabels(instance="release", namespace="kubernetes_namespace"))
    await telemetry.observe(at=AT)
    assert all('release="llm"' in p["query"] and 'kubernetes_namespace="prod"' in p["query"] for p in prom.asked)


async def test_a_rejected_query_is_a_query_error(prom: CannedPrometheus) -> None:
    prom.status = 400
    with pytest.raises(TelemetryQueryError, match="rejected"):
        await PrometheusTelemetry(prom.url, 60, instance="llm", namespace="prod").observe(at=AT)


async def test_odd_results_are_query_errors(prom: CannedPrometheus) -> None:
    prom.answers = {"prompt_tokens_bucket": [_sample(3.0)]}  # a bucket without `le`
    with pytest.raises(TelemetryQueryError, match="no 'le' label"):
        await PrometheusTelemetry(prom.url, 60, instance="llm", namespace="prod").observe(at=AT)
    prom.answers = {"sum(increase(disagg_requests_total": [_sample(1.0), _sample(2.0)]}
    with pytest.raises(TelemetryQueryError, match="expected one aggregated sample"):
        await PrometheusTelemetry(prom.url, 60, instance="llm", namespace="prod").observe(at=AT)


async def test_an_unreachable_prometheus_says_where_it_looked() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PrometheusUnavailable, match=f"Prometheus at {url} did not answer"):
        await PrometheusTelemetry(url, 60, instance="llm", namespace="prod", timeout_s=2).observe(at=AT)


def test_configuration_errors_name_the_setting() -> None:
    with pytest.raises(TelemetryConfigError, match="spec.replan.prometheusUrl"):
        PrometheusTelemetry("", 600)
    with pytest.raises(TelemetryConfigError, match="window must be positive"):
        PrometheusTelemetry("http://prom:9090", 0)


async def test_queries_run_off_the_event_loop(prom: CannedPrometheus) -> None:
    prom.delay_s = 0.1  # four queries: ~0.4 s in a worker thread
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await PrometheusTelemetry(prom.url, 60, instance="llm", namespace="prod").observe(at=AT)
    task.cancel()
    assert ticks >= 10  # a blocked loop would not have ticked at all
