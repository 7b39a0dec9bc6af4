"""The reconciler's pure rules: spec errors name fields, what counts as converged, ready, and owned."""

from __future__ import annotations

import pytest
from disagg_operator.errors import InvalidSpecError
from disagg_operator.reconcile import applied_hash, contains, controlled_by, is_ready, owner_of, parse_spec
from operator_plans import OWNER


def _spec(**over):
    base = {"model": {"preset": "opt-13b"}, "cluster": {"nodes": 1, "gpusPerNode": 4},
            "workload": {"rate": 1.0}, "slo": {"ttftMs": 250, "tpotMs": 100}}
    base.update(over)
    return base


@pytest.mark.parametrize(("over", "field", "text"), [
    ({"slo": {"ttftMs": -5, "tpotMs": 100}}, "spec.slo.ttftMs", "greater than 0"),
    ({"cluster": {"nodes": 1, "gpusPerNode": "eight"}}, "spec.cluster.gpusPerNode", "integer"),
    ({"search": {"maxTp": 0}}, "spec.search.maxTp", "greater than or equal to 1"),
    ({"model": {"preset": "opt-13b", "colour": "red"}}, "spec.model.colour", "Extra inputs"),
    ({"model": {}}, "spec.model", "exactly one of model.preset or model.custom"),
])
def test_invalid_spec_names_the_field(over, field, text):
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(_spec(**over))
    assert field in info.value.fields
    assert f"{field}: " in str(info.value) and text in str(info.value)


def test_valid_spec_parses_and_missing_spec_is_invalid():
    assert parse_spec(_spec()).cluster.gpus_per_node == 4
    with pytest.raises(InvalidSpecError, match="spec.model: Field required"):
        parse_spec(None)


def test_contains_is_a_recursive_subset_with_exact_lists():
    live = {"a": 1, "b": {"c": [1, {"d": 2, "server": "x"}], "e": "f"}, "status": {}}
    assert contains(live, {"b": {"c": [1, {"d": 2}]}})
    assert not contains(live, {"b": {"c": [1]}})  # a list that shrank is a change
    assert not contains(live, {"b": {"e": "g"}})
    assert not contains(live, {"z": None})


def test_applied_hash_is_order_independent_and_content_sensitive():
    assert applied_hash({"a": 1, "b": [1, 2]}) == applied_hash({"b": [1, 2], "a": 1})
    assert applied_hash({"a": 1}) != applied_hash({"a": 2})


@pytest.mark.parametrize(("obj", "ready"), [
    ({"kind": "ConfigMap"}, True),
    ({"kind": "StatefulSet", "spec": {"replicas": 2}, "status": {"readyReplicas": 2}}, True),
    ({"kind": "StatefulSet", "spec": {"replicas": 2}, "status": {"readyReplicas": 1}}, False),
    ({"kind": "Deployment", "spec": {"replicas": 1}}, False),
    # The controller has not yet seen the latest spec: its counts are stale.
    ({"kind": "Deployment", "metadata": {"generation": 3}, "spec": {"replicas": 1},
      "status": {"readyReplicas": 1, "observedGeneration": 2}}, False),
])
def test_workload_readiness(obj, ready):
    assert is_ready(obj) is ready


def test_ownership_by_uid_and_never_of_foreign_objects():
    mine = {"metadata": {"ownerReferences": [OWNER.reference()]}}
    other_uid = {"metadata": {"ownerReferences": [{**OWNER.reference(), "uid": "someone-else"}]}}
    not_controller = {"metadata": {"ownerReferences": [{**OWNER.reference(), "controller": False}]}}
    assert controlled_by(mine, OWNER)
    assert not controlled_by(other_uid, OWNER)  # a recreated resource of the same name
    assert not controlled_by(not_controller, OWNER)
    assert not controlled_by({"metadata": {}}, OWNER)


def test_owner_of_a_resource_body():
    body = {"apiVersion": "disagg.io/v1alpha1", "kind": "DisaggServing",
            "metadata": {"name": "chat", "namespace": "serving", "uid": OWNER.uid}}
    assert owner_of(body) == OWNER
