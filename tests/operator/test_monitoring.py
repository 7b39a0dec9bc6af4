"""The chart's monitoring: Grafana dashboard ConfigMap, PodMonitors and PrometheusRule.

Every PromQL expression (dashboard targets, alert and recording rules) is parsed by the real `promtool`,
and names only metrics docs/metrics.md documents (or that the rules themselves record).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from disagg_operator.render import ROLE_PORTS
from disagg_runtime.metrics import TPOT_BUCKETS, TTFT_BUCKETS
from helm_engine import template
from prometheus_client.utils import floatToGoString

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "disagg-operator"
DASHBOARD = CHART / "dashboards" / "disagg-serving.json"
# Grafana's own variables, replaced by what Grafana would put there, so promtool sees plain PromQL.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$ttft_slo": "0.25",
                "$tpot_slo": "0.1", "${datasource}": "prom"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan"}


def _values(**over):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in over.items():
        base = values.get(key)
        values[key] = {**base, **copy.deepcopy(value)} if isinstance(base, dict) else copy.deepcopy(value)
    return values


def _objects(**over) -> list[dict]:
    return [d for docs in template(CHART, _values(**over)).values() for d in docs]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append(expr)
    return out


def _rules() -> list[dict]:
    rule = next(d for d in _objects(prometheusRule={"enabled": True}) if d["kind"] == "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def promtool_check(exprs: list[str], tmp_path: Path, records: list[dict] | None = None) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (.ci/run installs the prometheus package)")
    rules = list(records or []) + [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `([a-z0-9_:]+)` \|", (REPO / "docs" / "metrics.md").read_text(), re.M))


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings, matchers and label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = m.group(0), expr[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS or expr[max(0, m.start() - 1)].isdigit():
            continue
        names.add(word)
    return names


def _documented(name: str, documented: set[str]) -> bool:
    for suffix in ("", "_bucket", "_sum", "_count"):
        if suffix and not name.endswith(suffix):
            continue
        if name.removesuffix(suffix) in documented:
            return True
    return False


def test_dashboard_is_a_configmap_for_the_grafana_sidecar():
    cm = next(d for d in _objects() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["disagg-serving.json"]) == _dashboard()
    other = _objects(grafanaDashboard={"namespace": "monitoring", "annotations": {"grafana_folder": "LLM"}})
    cm = next(d for d in other if d["kind"] == "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring" and cm["metadata"]["annotations"]["grafana_folder"] == "LLM"
    assert not any(d["kind"] == "ConfigMap" for d in _objects(grafanaDashboard={"enabled": False}))


def test_dashboard_has_the_panels_an_operator_of_the_service_needs():
    panels = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in _dashboard()["panels"]}
    need = {
        "Request rate by outcome": ["disagg_requests_total"],
        "TTFT p50 / p99 vs SLO": ["histogram_quantile(0.5", "histogram_quantile(0.99", "$ttft_slo"],
        "TPOT p50 / p99 vs SLO": ["histogram_quantile(0.5", "histogram_quantile(0.99", "$tpot_slo"],
        "SLO attainment": ['le="$ttft_slo"', 'le="$tpot_slo"', "disagg_operator_slo_attainment_target"],
        "KV-cache use by role": ["by (role)", "disagg_kv_blocks_used", "disagg_kv_blocks_free"],
        "Queue depth by role": ["by (role)", "disagg_queue_depth"],
        "KV transfer time (decode side)": ["disagg_kv_transfer_seconds_bucket"],
        "KV transfer bytes": ["disagg_kv_transfer_bytes_total"],
        "Preemptions by role": ["disagg_preemptions_total"],
        "Plan in force": ["disagg_operator_plan_info"],
        "Re-plans": ["disagg_operator_replans_total"],
    }
    for title, fragments in need.items():
        assert title in panels, title
        assert all(f in panels[title] for f in fragments), (title, panels[title])


def test_every_promql_expression_parses(tmp_path):
    exprs = _dashboard_exprs()
    rules = _rules()
    assert len(exprs) >= 15 and any("alert" in r for r in rules)
    run = promtool_check(exprs, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    path = tmp_path / "chart-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "chart", "rules": rules}]}))
    run = subprocess.run([shutil.which("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and f"{len(rules)} rules found" in run.stdout, run.stdout + run.stderr


def test_promtool_check_catches_a_broken_expression(tmp_path):
    run = promtool_check(['sum(rate(disagg_requests_total[5m])'], tmp_path)
    assert run.returncode != 0 and "unclosed left parenthesis" in (run.stdout + run.stderr)


def test_expressions_name_only_documented_metrics():
    documented = documented_metrics()
    assert "disagg_requests_total" in documented and "disagg_operator_plan_info" in documented
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    seen: set[str] = set()
    for expr in _dashboard_exprs() + [r["expr"] for r in rules]:
        names = metric_names(expr)
        seen |= names
        unknown = {n for n in names if n not in recorded and not _documented(n, documented)}
        assert not unknown, f"{unknown} in {expr!r} are not in docs/metrics.md"
    assert len(seen) >= 15, seen
    assert metric_names('sum by (le) (rate(foo_bucket{le="1"}[5m])) / on (x) bar') == {"foo_bucket", "bar"}


def test_slo_choices_are_histogram_bucket_edges():
    edges = {"ttft_slo": {floatToGoString(b) for b in TTFT_BUCKETS},
             "tpot_slo": {floatToGoString(b) for b in TPOT_BUCKETS}}
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    for name, allowed in edges.items():
        options = [o["value"] for o in variables[name]["options"]]
        assert options and set(options) <= allowed, (name, set(options) - allowed)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]
    assert values["ttftSloSeconds"] in edges["ttft_slo"] and values["tpotSloSeconds"] in edges["tpot_slo"]


def test_prometheus_operator_objects_are_off_by_default_and_scrape_every_role_when_on():
    kinds = {d["kind"] for d in _objects()}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    monitors = [d for d in _objects(podMonitor={"enabled": True, "labels": {"release": "kps"}})
                if d["kind"] == "PodMonitor"]
    runtime, operator = sorted(monitors, key=lambda m: m["metadata"]["name"], reverse=True)
    assert runtime["metadata"]["labels"]["release"] == "kps"
    ports = {e["port"] for e in runtime["spec"]["podMetricsEndpoints"]}
    assert ports == set(ROLE_PORTS), "one endpoint per container port name the operator renders"
    assert all(e["relabelings"][0]["targetLabel"] == "disaggserving" for e in runtime["spec"]["podMetricsEndpoints"])
    assert runtime["spec"]["namespaceSelector"] == {"any": True}
    deploy = next(d for d in _objects() if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert operator["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in container["ports"]}
    assert "--metrics-port=8081" in container["args"]
    scoped = next(d for d in _objects(podMonitor={"enabled": True}, watchNamespaces=["a"])
                  if d["kind"] == "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["a"]}
