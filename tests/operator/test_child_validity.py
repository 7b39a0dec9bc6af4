"""Children a real API server accepts for any legal DisaggServing name, checked with Kubernetes' own
schemas (kubernetes-validate) and name grammars; scheduling inputs a server would refuse are invalid specs."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
from disagg_operator import labels as lb
from disagg_operator.errors import RenderError
from disagg_operator.reconcile import parse_spec
from disagg_operator.render import render_children
from disagg_operator.validation import child_problems, validate_children
from disagg_planner.api.kube_names import is_dns1035_label, is_dns1123_subdomain
from operator_plans import colocated_plan, high_plan, low_plan, render_input, spec

# Legal CR names (DNS-1123 subdomains), including those that are not valid Service names.
CR_NAMES = ["chat", "chat.bot.v1", "1chat", "9", "a" * 63, "b" * 64, "x" * 253, "chat-bot", "a.b.c.d.e",
            ("long." * 50)[:252] + "z", "0-0", "my.app-1.prod"]
PLANS = {"high": high_plan, "low": low_plan, "colocated": colocated_plan}


@pytest.mark.parametrize("name", CR_NAMES)
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_every_child_of_any_legal_name_is_valid_for_the_api_server(name, plan):
    assert is_dns1123_subdomain(name)
    objs = render_children(render_input(PLANS[plan](), owner_name=name))
    for obj in objs:
        kubernetes_validate.validate(obj, "1.33", strict=True)
        assert child_problems(obj) == [], obj["metadata"]["name"]
        if obj["kind"] == "Service":
            assert is_dns1035_label(obj["metadata"]["name"])
    validate_children(objs)
    keys = [f"{o['kind']}/{o['metadata']['name']}" for o in objs]
    assert len(set(keys)) == len(keys)


def test_names_that_map_alike_still_get_distinct_children():
    a = {o["metadata"]["name"] for o in render_children(render_input(high_plan(), owner_name="chat.bot"))}
    b = {o["metadata"]["name"] for o in render_children(render_input(high_plan(), owner_name="chat-bot"))}
    assert not a & b
    assert lb.service_name("chat") == "chat" and lb.service_name("1chat").startswith("d-1chat-")


def test_a_long_name_keeps_its_instance_label_valid_and_selectable():
    name = "y" * 100
    objs = render_children(render_input(high_plan(), owner_name=name))
    values = {o["metadata"]["labels"][lb.INSTANCE] for o in objs}
    assert values == {lb.instance_value(name)} and len(lb.instance_value(name)) <= 63
    assert all(o["metadata"]["ownerReferences"][0]["name"] == name for o in objs)


@pytest.mark.parametrize("scheduling,field", [
    ({"nodeSelector": {"bad key!": "x"}}, "scheduling.nodeSelector"),
    ({"nodeSelector": {"pool": "has space"}}, "scheduling.nodeSelector"),
    ({"nodeSelector": {"pool": "v" * 64}}, "scheduling.nodeSelector"),
    ({"nodeSelector": {"UPPER.example.com/x": "v"}}, "scheduling.nodeSelector"),
    ({"gpuResource": "gpu"}, "scheduling.gpuResource"),
    ({"gpuResource": "kubernetes.io/gpu"}, "scheduling.gpuResource"),
    ({"gpuResource": "nvidia.com/g p u"}, "scheduling.gpuResource"),
    ({"tolerations": [{"key": "bad key", "operator": "Exists"}]}, "scheduling.tolerations.0"),
    ({"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}, "scheduling.tolerations.0"),
    ({"tolerations": [{"operator": "Equal", "value": "v"}]}, "scheduling.tolerations.0"),
    ({"tolerations": [{"key": "k", "value": "v" * 70}]}, "scheduling.tolerations.0"),
    ({"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}, "scheduling.tolerations.0"),
])
def test_scheduling_inputs_an_api_server_refuses_are_invalid_specs(scheduling, field):
    doc = spec().model_dump(mode="json", by_alias=True)
    doc["scheduling"] = scheduling
    from disagg_operator.errors import InvalidSpecError

    with pytest.raises(InvalidSpecError) as exc:
        parse_spec(doc)
    assert any(f.startswith(f"spec.{field}") for f in exc.value.fields), exc.value.fields


@pytest.mark.parametrize("image", ["", " ghcr.io/x:1", "ghcr.io/x:1 ", "GHCR.io/UPPER", "x::1", "a b", "x:tag:tag",
                                   "ghcr.io/x@sha256:short", "-x", "x/"])
def test_image_strings_that_are_no_image_reference_are_invalid_specs(image):
    doc = spec().model_dump(mode="json", by_alias=True)
    doc["runtime"]["image"] = image
    from disagg_operator.errors import InvalidSpecError

    with pytest.raises(InvalidSpecError) as exc:
        parse_spec(doc)
    assert "spec.runtime.image" in exc.value.fields


@pytest.mark.parametrize("image", ["nginx", "ghcr.io/disagg/runtime:0.1.0", "localhost:5000/a/b:c",
                                   "registry.example.com:443/team/rt@sha256:" + "0" * 64, "a/b_c__d-e.f:V1.2-x"])
def test_ordinary_image_references_are_accepted(image):
    doc = spec().model_dump(mode="json", by_alias=True)
    doc["runtime"]["image"] = image
    assert parse_spec(doc).runtime.image == image


def test_a_child_the_server_would_refuse_stops_the_whole_apply():
    objs = render_children(render_input(high_plan()))
    objs[3]["metadata"]["name"] = "Not_A.Name"
    router_service = next(o for o in objs if o["kind"] == "Service" and o["spec"].get("type") == "ClusterIP")
    router_service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(RenderError) as exc:
        validate_children(objs)
    message = str(exc.value)
    assert "none was applied" in message and "Not_A.Name" in message and re.search(r"eighty|port", message)
