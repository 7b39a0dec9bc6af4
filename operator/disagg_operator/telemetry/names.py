"""Every Prometheus name the telemetry reads, in one place.

The metric names duplicate `disagg_runtime.metrics` (the router's `RequestMetrics`) on purpose: the
operator image has no torch and must not import the runtime. `tests/operator/test_telemetry_names.py`
imports both and fails when they disagree.

The label names are what Prometheus attaches when it scrapes a pod, not what the runtime exports: the
usual `kubernetes-pods` scrape job (the prometheus-community chart's, for one) maps pod labels with
`labelmap: __meta_kubernetes_pod_label_(.+)`, so `app.kubernetes.io/instance` arrives as
`app_kubernetes_io_instance`, and writes the namespace to `namespace`. A Prometheus set up differently
passes its own `ScrapeLabels`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricNames:
    """Series names of the router's request metrics (as Prometheus stores them, suffixes included)."""

    requests_total: str = "disagg_requests_total"
    outcome_label: str = "outcome"
    # Every outcome but `invalid`: a malformed request never reaches a GPU, a rejected one is unmet demand.
    demand_outcomes: tuple[str, ...] = ("ok", "error", "rejected", "aborted")
    prompt_tokens_bucket: str = "disagg_request_prompt_tokens_bucket"
    generation_tokens_bucket: str = "disagg_request_generation_tokens_bucket"
    bucket_label: str = "le"


@dataclass(frozen=True)
class ScrapeLabels:
    """Target labels that tell one DisaggServing's series from another's."""

    instance: str = "app_kubernetes_io_instance"
    namespace: str = "namespace"


def selector(matchers: Mapping[str, str]) -> str:
    """`{a="x",b="y"}` with PromQL string escaping; an equality matcher per entry, sorted."""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(matchers.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
