"""The example manifests: valid specs, and (chatbot) planned and rendered end to end with the real planner."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from disagg_operator.crd import API_VERSION, KIND
from disagg_operator.reconcile import owner_of, parse_spec
from disagg_operator.render import RenderInput, render_children

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("chatbot", "code", "summarization")
SPECS = sorted((REPO / "examples" / "specs").glob("*.yaml"))


def test_examples_are_split_into_specs_and_kubernetes_objects():
    top = sorted(p.name for p in (REPO / "examples").iterdir())
    assert top == ["k8s", "specs"], "a planner spec goes in examples/specs, a Kubernetes object in examples/k8s"
    assert SPECS and sorted(p.name for p in (REPO / "examples" / "k8s").iterdir())
    for path in (REPO / "examples" / "k8s").iterdir():
        for doc in filter(None, yaml.safe_load_all(path.read_text())):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_examples_are_bare_specs_without_deprecated_fields(path, capsys):
    from disagg_cli.specfile import load_spec

    assert "apiVersion" not in yaml.safe_load(path.read_text())
    spec = load_spec(path)
    assert spec.deprecations() == [] and capsys.readouterr().err == ""


def _manifest(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / "k8s" / f"disaggserving-{name}.yaml").read_text())


@pytest.mark.parametrize("name", WORKLOADS)
def test_example_is_a_valid_disaggserving(name):
    manifest = _manifest(name)
    assert manifest["apiVersion"] == API_VERSION and manifest["kind"] == KIND
    spec = parse_spec(manifest["spec"])
    assert spec.workload.dataset == name


def test_chatbot_example_plans_and_renders_valid_children():
    from disagg_planner.search import find_plan

    manifest = _manifest("chatbot")
    manifest["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    spec = parse_spec(manifest["spec"])
    plan = find_plan(spec, None, workers=1)
    children = render_children(RenderInput(owner=owner_of(manifest), spec=spec, plan=plan,
                                           plan_hash=spec.planning_hash()))
    gpus = 0
    for obj in children:
        kubernetes_validate.validate(obj, "1.33", strict=True)
        if obj["kind"] == "StatefulSet":
            pod = obj["spec"]["template"]["spec"]
            gpus += obj["spec"]["replicas"] * sum(int(c["resources"]["limits"]["nvidia.com/gpu"])
                                                  for c in pod["containers"])
    assert gpus == plan.gpus, "the workloads request exactly the plan's GPUs"
