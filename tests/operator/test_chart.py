"""The Helm chart lints clean and renders, with the real Helm engine, into valid, least-privilege objects."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from disagg_operator.crd import render_crd_yaml
from disagg_operator.kube import CHILD_KINDS
from helm_engine import ChartError, lint, template

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "disagg-operator"


def _values(**over):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values.update(copy.deepcopy(over))
    return values


def _docs(**over):
    rendered = template(CHART, _values(**over))
    return [doc for docs in rendered.values() for doc in docs]


MONITORING = {"podMonitor": {"enabled": True, "interval": "30s", "labels": {}},
              "prometheusRule": {**yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"],
                                 "enabled": True}}


@pytest.mark.parametrize("over", [{}, {"watchNamespaces": ["team-a", "team-b"], "profilesConfigMap": "profiles"},
                                  {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
                                  {**MONITORING, "metricsPort": 9090}],
                         ids=["defaults", "namespaced", "existing-account", "monitoring"])
def test_templates_render_to_valid_objects(over):
    docs = _docs(**over)
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            # Prometheus Operator kinds: no schema in kubernetes-validate; test_monitoring.py checks them.
            assert doc["kind"] in ("PodMonitor", "PrometheusRule") and doc["metadata"]["name"] and doc["spec"]
            continue
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_cluster_wide_by_default_namespaced_when_asked():
    kinds = {d["kind"] for d in _docs()}
    assert {"ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Deployment"} <= kinds
    docs = _docs(watchNamespaces=["team-a", "team-b"])
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    assert not any(d["kind"] == "ClusterRoleBinding" for d in docs)
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_rbac_is_least_privilege():
    role = next(d for d in _docs() if d["kind"] == "ClusterRole")
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert all("*" not in verbs for verbs in grants.values())
    assert not any(r in ("pods", "roles", "clusterroles", "rolebindings") for _, r in grants)
    # The internal-token Secrets it owns: no watch (it never streams Secrets), nothing beyond its verbs.
    assert grants[("", "secrets")] == {"get", "list", "create", "patch", "delete"}
    for kind in CHILD_KINDS:  # every kind it renders, it can apply, list (pruning) and delete
        group = kind.api_version.rpartition("/")[0]
        assert {"get", "list", "create", "patch", "delete"} <= grants[(group, kind.plural)], kind
    assert grants[("disagg.io", "disaggservings")] == {"get", "list", "watch", "patch"}  # never create/delete CRs
    assert grants[("disagg.io", "disaggservings/status")] == {"get", "patch"}
    assert grants[("apps", "statefulsets")] == {"get", "list", "watch", "create", "patch", "delete"}
    assert grants[("", "events")] == {"create", "patch"}


def test_operator_pod_is_hardened_and_single():
    deploy = next(d for d in _docs() if d["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/disagg/operator:0.1.0"
    assert container["args"][0] == "operator" and container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_chart_ships_the_generated_crd():
    assert (CHART / "crds" / "disaggservings.yaml").read_text() == render_crd_yaml()


def test_missing_values_fail_loudly():
    with pytest.raises(ChartError, match="image"):
        template(CHART, {"image": None})


@pytest.mark.parametrize("over", [{}, {"watchNamespaces": ["team-a"], "profilesConfigMap": "profiles"}, MONITORING])
def test_helm_lint_is_clean(over):
    assert lint(CHART, _values(**over)) == []


def test_helm_lint_reports_a_broken_template(tmp_path):
    import shutil

    broken = tmp_path / "disagg-operator"
    shutil.copytree(CHART, broken)
    with (broken / "templates" / "serviceaccount.yaml").open("a") as f:
        f.write("{{ .Values.missing.deeper }}\n")
    findings = lint(broken)
    assert findings and any("missing" in f for f in findings)
