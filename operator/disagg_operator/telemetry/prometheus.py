"""Read one DisaggServing's workload from Prometheus: arrival rate and length histograms.

Four instant queries, all evaluated at the same timestamp so they describe the same window:

- arrivals:   sum(increase(disagg_requests_total{sel, outcome=~demand}[W]))
- first seen: min(min_over_time(timestamp(disagg_requests_total{sel})[W+M:R]))  (how much of W has data)
- lengths:    sum by (le) (increase(disagg_request_{prompt,generation}_tokens_bucket{sel}[W]))

`prometheus_api_client` is synchronous (requests); every query batch runs in a worker thread so the
operator's event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import math
import time as wallclock
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from .buckets import from_buckets, parse_le
from .errors import PrometheusUnavailable, TelemetryConfigError, TelemetryQueryError
from .names import MetricNames, ScrapeLabels, selector
from .observation import WorkloadObservation

# Subquery steps per window for the "first seen" query: fine enough that the measured age is within
# 0.5% of the window, coarse enough that a day-long window stays a cheap query.
_AGE_STEPS = 200
# The "first seen" subquery looks this much further back than the window. At a step, timestamp() gives
# the latest sample at or before it, so a series older than the window can read as first seen up to a
# scrape interval (plus a step) inside the window; looking back further than any usual scrape interval
# makes such a series read as older than the window, as it is.
_AGE_MARGIN_S = 120.0


@dataclass(frozen=True)
class PromQueries:
    """The PromQL of one observation (kept apart from the client so it can be read and tested)."""

    arrivals: str
    first_seen: str
    prompt_buckets: str
    generation_buckets: str

    @classmethod
    def build(cls, matchers: dict[str, str], window_s: float, names: MetricNames) -> PromQueries:
        window = _duration(window_s)
        step_s = max(1.0, window_s / _AGE_STEPS)
        step, age_range = _duration(step_s), _duration(window_s + _AGE_MARGIN_S + step_s)
        sel = selector(matchers)
        outcomes = "|".join(names.demand_outcomes)
        demand = sel[:-1] + ("," if matchers else "") + f'{names.outcome_label}=~"{outcomes}"}}'

        def by_le(metric: str) -> str:
            return f"sum by ({names.bucket_label}) (increase({metric}{sel}[{window}]))"

        return cls(
            arrivals=f"sum(increase({names.requests_total}{demand}[{window}]))",
            first_seen=f"min(min_over_time(timestamp({names.requests_total}{sel})[{age_range}:{step}]))",
            prompt_buckets=by_le(names.prompt_tokens_bucket),
            generation_buckets=by_le(names.generation_tokens_bucket),
        )


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass
class PrometheusTelemetry:
    """Observes one DisaggServing (`instance` in `namespace`) through the Prometheus at `url`."""

    url: str
    window_s: float
    instance: str = ""
    namespace: str = ""
    names: MetricNames = field(default_factory=MetricNames)
    labels: ScrapeLabels = field(default_factory=ScrapeLabels)
    timeout_s: float = 10.0
    _client: PrometheusConnect | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.url:
            raise TelemetryConfigError("no Prometheus URL: set spec.replan.prometheusUrl or the operator's "
                                       "--prometheus-url")
        if self.window_s <= 0:
            raise TelemetryConfigError(f"window must be positive, got {self.window_s} s")

    @property
    def matchers(self) -> dict[str, str]:
        """Label matchers of this resource's series; an empty instance or namespace does not filter."""
        wanted = {self.labels.instance: self.instance, self.labels.namespace: self.namespace}
        return {k: v for k, v in wanted.items() if v}

    def queries(self) -> PromQueries:
        return PromQueries.build(self.matchers, self.window_s, self.names)

    async def observe(self, at: float | None = None) -> WorkloadObservation:
        """The workload over the window ending at `at` (unix seconds; default now)."""
        return await asyncio.to_thread(self.observe_sync, wallclock.time() if at is None else at)

    def observe_sync(self, at: float) -> WorkloadObservation:
        """Blocking form of `observe`; call it from a thread, never from the event loop."""
        q = self.queries()
        arrivals_result = self._query(q.arrivals, at)
        first_seen_result = self._query(q.first_seen, at)
        prompt = from_buckets(self._buckets(self._query(q.prompt_buckets, at)))
        generation = from_buckets(self._buckets(self._query(q.generation_buckets, at)))

        series_found = bool(first_seen_result)
        requests_in_window = _scalar(arrivals_result)
        first_seen = _scalar(first_seen_result) if series_found else at
        covered = min(self.window_s, max(0.0, at - first_seen))
        rate = requests_in_window / covered if covered > 0 else 0.0
        notes = [n for n in (prompt.overflow_note, generation.overflow_note) if n]
        if not series_found:
            notes.append(f"no {self.names.requests_total} series matches {selector(self.matchers)} at {self.url}: "
                         "is Prometheus scraping the router pods, with their pod labels mapped to target labels?")
        elif covered < self.window_s:
            notes.append(f"series exist for {covered:.0f} s of the {self.window_s:.0f} s window; "
                         "the rate is over that part")
        return WorkloadObservation(
            time=at, window_s=self.window_s, covered_s=covered, requests=requests_in_window, rate_rps=rate,
            input_lengths=prompt.histogram, output_lengths=generation.histogram,
            input_overflow=prompt.overflow, output_overflow=generation.overflow,
            series_found=series_found, notes=tuple(notes))

    def _connect(self) -> PrometheusConnect:
        if self._client is None:
            # Few, quick retries: the next timer tick is the real retry, and a hung tick delays it.
            retry = Retry(total=2, backoff_factor=0.2, status_forcelist=(502, 503, 504))
            self._client = PrometheusConnect(url=self.url.rstrip("/"), retry=retry, timeout=self.timeout_s,
                                             disable_ssl=False)
        return self._client

    def _query(self, promql: str, at: float) -> list[dict[str, Any]]:
        try:
            result = self._connect().custom_query(promql, params={"time": f"{at:.3f}"})
        except requests.RequestException as exc:
            raise PrometheusUnavailable(f"Prometheus at {self.url} did not answer: {exc}; check "
                                        "spec.replan.prometheusUrl and that the operator can reach it") from exc
        except PrometheusApiClientException as exc:
            raise TelemetryQueryError(f"Prometheus at {self.url} rejected {promql!r}: {exc}") from exc
        if not isinstance(result, list):
            raise TelemetryQueryError(f"{promql!r} returned {type(result).__name__}, expected an instant vector")
        return result

    def _buckets(self, result: list[dict[str, Any]]) -> list[tuple[float, float]]:
        out = []
        for sample in result:
            le = sample.get("metric", {}).get(self.names.bucket_label)
            if le is None:
                raise TelemetryQueryError(f"a bucket sample has no {self.names.bucket_label!r} label: {sample}")
            out.append((parse_le(le), _value(sample)))
        return out


def _value(sample: dict[str, Any]) -> float:
    try:
        value = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise TelemetryQueryError(f"sample without a numeric value: {sample}") from None
    return value if math.isfinite(value) else 0.0


def _scalar(result: list[dict[str, Any]]) -> float:
    """The value of a query that aggregates to at most one sample (none: 0)."""
    if len(result) > 1:
        raise TelemetryQueryError(f"expected one aggregated sample, got {len(result)}")
    return _value(result[0]) if result else 0.0
