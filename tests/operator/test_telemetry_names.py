"""The operator's copy of the router's metric names agrees with the runtime's metrics module."""

from __future__ import annotations

import pytest
from disagg_operator.telemetry import MetricNames
from prometheus_client import CollectorRegistry

runtime_metrics = pytest.importorskip("disagg_runtime.metrics",
                                      reason="runtime not installed: nothing to compare the names with")


def _exposed() -> dict[str, set[str]]:
    """Sample name -> label names, as the router's /metrics exposes them."""
    registry = CollectorRegistry()
    recorder = runtime_metrics.RequestMetrics.create(registry)
    recorder.finished(prompt_tokens=10, output_tokens=5, ttft=0.1, e2e=0.5)
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_series_names_and_labels_match_the_runtime() -> None:
    names, exposed = MetricNames(), _exposed()
    assert exposed.get(names.requests_total) == {names.outcome_label}
    assert names.bucket_label in exposed.get(names.prompt_tokens_bucket, set())
    assert names.bucket_label in exposed.get(names.generation_tokens_bucket, set())


def test_demand_outcomes_are_runtime_outcomes() -> None:
    assert set(MetricNames().demand_outcomes) <= set(runtime_metrics.OUTCOMES)
    assert "ok" in MetricNames().demand_outcomes
