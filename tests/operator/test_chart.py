"""The Helm chart renders (without helm) into valid, least-privilege Kubernetes objects."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from disagg_operator.crd import render_crd_yaml
from disagg_operator.kube import CHILD_KINDS
from helm_lite import Chart, TemplateError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "disagg-operator"
RELEASE = {"Name": "disagg", "Namespace": "disagg-system", "Service": "Helm"}


def _values(**over):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values.update(copy.deepcopy(over))
    return values


def _docs(**over):
    rendered = Chart(CHART, _values(**over), RELEASE).render()
    return [doc for docs in rendered.values() for doc in docs]


@pytest.mark.parametrize("over", [{}, {"watchNamespaces": ["team-a", "team-b"], "profilesConfigMap": "profiles"},
                                  {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}}])
def test_templates_render_to_valid_objects(over):
    docs = _docs(**over)
    assert docs
    for doc in docs:
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
    values = _values()
    del values["image"]
    with pytest.raises(TemplateError, match="no value 'image'"):
        Chart(CHART, values, RELEASE).render()


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed; helm_lite renders the chart instead")
def test_helm_lint_and_template():
    subprocess.run(["helm", "lint", str(CHART)], check=True)
    out = subprocess.run(["helm", "template", "disagg", str(CHART), "-n", "disagg-system"], check=True,
                         capture_output=True, text=True).stdout
    for doc in filter(None, yaml.safe_load_all(out)):
        kubernetes_validate.validate(doc, "1.33", strict=True)
