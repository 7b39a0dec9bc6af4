"""Metric names match docs/metrics.md, registries are per process, and observations land where expected."""

from __future__ import annotations

import re
from pathlib import Path

from disagg_runtime.metrics import LENGTH_BUCKETS, RequestMetrics, WorkerMetrics, render
from prometheus_client import CollectorRegistry

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def exported_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def _serving_section() -> str:
    # The runtime's table; the operator's own metrics follow under their own heading (tests/operator).
    return DOC.read_text().split("\n## Operator metrics", 1)[0]


def documented() -> dict[str, str]:
    rows = re.findall(r"^\| `(disagg_[a-z0-9_]+)` \| (\w+) \|", _serving_section(), re.M)
    return dict(rows)


def pending() -> set[str]:
    """Rows documented ahead of the code that emits them (their meaning says `emitted once ...`)."""
    return set(re.findall(r"^\| `(disagg_[a-z0-9_]+)` \|.*emitted once", _serving_section(), re.M))


def test_every_metric_is_documented_with_its_type_and_nothing_else_is():
    reg = CollectorRegistry()
    RequestMetrics.create(reg)
    WorkerMetrics.create(reg, "decode")
    types = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in reg.collect()}
    docs = documented()
    assert set(docs) - set(types) <= pending(), "documented but not exported (and not marked pending)"
    assert {name: docs.get(name) for name in types} == types


def test_length_buckets_in_the_doc_match_the_code():
    text = DOC.read_text().replace("\n", " ")
    listed = re.search(r"buckets `([0-9, ]+)`", text).group(1)
    assert tuple(int(x) for x in listed.split(",")) == LENGTH_BUCKETS


def test_request_metrics_record_a_finished_request():
    reg = CollectorRegistry()
    m = RequestMetrics.create(reg)
    m.finished(prompt_tokens=100, output_tokens=11, ttft=0.2, e2e=1.2)
    m.ended("rejected")
    get = reg.get_sample_value
    assert get("disagg_requests_total", {"outcome": "ok"}) == 1
    assert get("disagg_requests_total", {"outcome": "rejected"}) == 1
    assert get("disagg_requests_total", {"outcome": "aborted"}) == 0  # exported before it happens
    assert get("disagg_request_prompt_tokens_bucket", {"le": "128.0"}) == 1
    assert get("disagg_request_prompt_tokens_bucket", {"le": "64.0"}) == 0
    assert get("disagg_time_per_output_token_seconds_sum") == 0.1  # (1.2 - 0.2) / (11 - 1)
    assert get("disagg_e2e_request_latency_seconds_count") == 1


def test_worker_metrics_are_labelled_by_role_and_registries_are_independent():
    a, b = CollectorRegistry(), CollectorRegistry()
    prefill, decode = WorkerMetrics.create(a, "prefill"), WorkerMetrics.create(b, "decode")
    prefill.transferred(channel="tcp", wire_bytes=4096, seconds=0.002)
    prefill.set_load(queued=3, running=2, blocks_used=10, blocks_free=90)
    decode.stepped(seconds=0.01, tokens=8)
    assert a.get_sample_value("disagg_kv_transfer_bytes_total", {"role": "prefill", "channel": "tcp"}) == 4096
    assert a.get_sample_value("disagg_queue_depth", {"role": "prefill"}) == 3
    assert b.get_sample_value("disagg_kv_transfer_bytes_total", {"role": "decode", "channel": "tcp"}) is None
    assert b.get_sample_value("disagg_engine_step_seconds_count", {"role": "decode"}) == 1
    body, content_type = render(a)
    assert b'disagg_kv_blocks_free{role="prefill"} 90.0' in body and content_type.startswith("text/plain")
