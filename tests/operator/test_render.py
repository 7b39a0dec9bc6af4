"""Rendered children: valid Kubernetes objects with the plan's shapes, GPUs, topology and ownership."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import kubernetes_validate
import pytest
from disagg_operator import labels as lb
from disagg_operator.errors import RenderError
from disagg_operator.render import RenderSettings, child_key, render_children, workload_endpoints
from disagg_planner.api import PhasePlan
from disagg_runtime.router.pool import read_endpoints
from disagg_runtime.serve.options import add_serve_arguments, check_serve_arguments
from operator_plans import OWNER, colocated_plan, high_plan, low_plan, render_input, spec

K8S_VERSIONS = ("1.29", "1.33")


def _by_key(objs):
    """`Kind/name`, with worker groups under `Kind/<instance>-<component>`: their names end in the group's
    shape id (checked here, and in test_worker_names_follow_the_shape_not_the_replicas)."""
    out = {}
    for obj in objs:
        key, shape = child_key(obj), obj["metadata"]["labels"].get(lb.SHAPE)
        if shape is not None:
            assert key.endswith(f"-{shape}"), key
            key = key[:-len(shape) - 1]
        out[key] = obj
    return out


def _pod(obj):
    return obj["spec"]["template"]["spec"]


def _gpus(obj):
    return {c["name"]: int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in _pod(obj)["containers"]}


SMALL_NODES = {"cluster": {"nodes": 4, "gpusPerNode": 4, "gpuType": "A100-80GB"}}


@pytest.mark.parametrize(("plan", "over"), [(high_plan(), {}), (low_plan(), {}), (low_plan(), SMALL_NODES),
                                            (colocated_plan(), {})],
                         ids=["high", "low-unit", "low-segments", "colocated"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_child_validates_against_the_kubernetes_schemas(plan, over, version):
    for obj in render_children(render_input(plan, spec(**over))):
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_broken_child():
    obj = _by_key(render_children(render_input(high_plan())))["StatefulSet/chat-prefill"]
    obj["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, "1.33", strict=True)


def test_high_affinity_one_statefulset_per_phase_with_tp_times_pp_gpus():
    children = _by_key(render_children(render_input(high_plan())))
    assert sorted(children) == sorted([
        "ServiceAccount/chat-runtime", "ConfigMap/chat-plan", "Service/chat-prefill", "StatefulSet/chat-prefill",
        "Service/chat-decode", "StatefulSet/chat-decode", "Deployment/chat-router", "Service/chat",
        *(f"NetworkPolicy/chat-np-{p}" for p in ("default-deny", "router", "prefill-http", "decode-http",
                                                 "prefill-kv", "kv-nccl", "ranks")),
    ])
    prefill, decode = children["StatefulSet/chat-prefill"], children["StatefulSet/chat-decode"]
    assert prefill["spec"]["replicas"] == 3 and _gpus(prefill) == {"prefill": 2}
    assert decode["spec"]["replicas"] == 1 and _gpus(decode) == {"decode": 4}  # tp2 x pp2
    decode_args = _runtime_args(_pod(decode)["containers"][0])
    assert (decode_args.role, decode_args.tp, decode_args.pp, decode_args.port) == ("decode", 2, 2, 8001)
    assert decode_args.model_path == "/models/opt-13b" and decode_args.kv_channel == "auto"
    prefill_args = _runtime_args(_pod(prefill)["containers"][0])
    assert (prefill_args.role, prefill_args.kv_port, prefill_args.prefill_token_budget) == ("prefill", 8100, 4096)
    spread = _pod(prefill)["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    assert spread["labelSelector"]["matchLabels"] == prefill["spec"]["selector"]["matchLabels"]


def _runtime_args(container):
    """The container's args parsed by the runtime's own `disagg serve` parser (the contract)."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert container["command"] == ["disagg"] and container["args"][0] == "serve"
    args = parser.parse_args(container["args"][1:])
    check_serve_arguments(args)  # the runtime's cross-flag rules (model source, router endpoints, stage)
    return args


def test_router_reads_per_pod_endpoints_from_the_config_map(tmp_path):
    children = _by_key(render_children(render_input(high_plan())))
    args = _runtime_args(_pod(children["Deployment/chat-router"])["containers"][0])
    assert args.role == "router" and args.port == 8000 and args.endpoints_file == "/etc/disagg/endpoints.json"
    endpoints = json.loads(children["ConfigMap/chat-plan"]["data"]["endpoints.json"])
    pre, dec = (children[f"StatefulSet/chat-{c}"]["metadata"]["name"] for c in ("prefill", "decode"))
    assert endpoints == {
        "prefill": [f"http://{pre}-{i}.{pre}.serving.svc:8000" for i in range(3)],
        "decode": [f"http://{dec}-0.{dec}.serving.svc:8001"],
    }
    (tmp_path / "endpoints.json").write_text(children["ConfigMap/chat-plan"]["data"]["endpoints.json"])
    assert read_endpoints(tmp_path / "endpoints.json") == endpoints  # the router's own reader accepts it
    assert children["Service/chat-prefill"]["spec"]["clusterIP"] == "None"
    assert children["Service/chat"]["spec"]["ports"][0]["port"] == 80


def test_without_a_model_path_workers_get_random_weights_of_the_shape():
    s = spec(model={"preset": "tiny-llama"})
    args = _runtime_args(_pod(_by_key(render_children(render_input(high_plan(), s)))["StatefulSet/chat-decode"])
                         ["containers"][0])
    assert args.model_path is None and args.model_spec == "/etc/disagg/model.json"


def test_low_affinity_unit_that_fits_a_node_is_one_pod_with_both_instances():
    children = _by_key(render_children(render_input(low_plan())))  # 4 + 2 GPUs on 8-GPU nodes
    assert [k for k in children if k.startswith("StatefulSet/")] == ["StatefulSet/chat-unit"]
    unit = children["StatefulSet/chat-unit"]
    assert unit["spec"]["replicas"] == 2 and _gpus(unit) == {"prefill": 4, "decode": 2}
    roles = [_runtime_args(c).role for c in _pod(unit)["containers"]]
    assert roles == ["prefill", "decode"]
    endpoints = json.loads(children["ConfigMap/chat-plan"]["data"]["endpoints.json"])
    name = unit["metadata"]["name"]
    assert endpoints["prefill"] == [f"http://{name}-{i}.{name}.serving.svc:8000" for i in range(2)]
    assert endpoints["decode"] == [f"http://{name}-{i}.{name}.serving.svc:8001" for i in range(2)]


def test_low_affinity_pairs_same_stage_segments_in_one_pod():
    children = _by_key(render_children(render_input(low_plan(), spec(**SMALL_NODES))))
    segments = sorted(k for k in children if k.startswith("StatefulSet/"))
    assert segments == ["StatefulSet/chat-segment-s0", "StatefulSet/chat-segment-s1"]
    for stage, key in enumerate(segments):
        sts = children[key]
        assert sts["spec"]["replicas"] == 2  # one pod per prefill-decode unit
        assert _gpus(sts) == {"prefill": 2, "decode": 1}  # one stage: tp GPUs of each phase, on one node
        for container in _pod(sts)["containers"]:
            assert _runtime_args(container).stage == stage
        assert sts["metadata"]["labels"][lb.PHASE] == "paired"
    # The GPUs of one instance add up to tp x pp across its stage pods.
    assert sum(_gpus(children[k])["prefill"] for k in segments) == 2 * 2


def test_colocated_plan_has_one_workload():
    children = _by_key(render_children(render_input(colocated_plan())))
    sts = [k for k in children if k.startswith("StatefulSet/")]
    assert sts == ["StatefulSet/chat-colocated"]
    assert children[sts[0]]["spec"]["replicas"] == 4 and _gpus(children[sts[0]]) == {"colocated": 1}


def test_a_chunked_prefill_plan_renders_its_scheduler_and_a_workload_of_its_own():
    priority = colocated_plan().model_copy(update={"colocated_prefill": "priority"})
    chunked = colocated_plan().model_copy(update={"colocated_prefill": "chunked", "chunk_token_budget": 512})
    names, args = {}, {}
    for name, plan in (("priority", priority), ("chunked", chunked)):
        [sts] = [o for o in render_children(render_input(plan)) if o["kind"] == "StatefulSet"]
        names[name] = sts["metadata"]["name"]
        [container] = _pod(sts)["containers"]
        args[name] = _runtime_args(container)
    assert (args["chunked"].colocated_prefill, args["chunked"].chunk_token_budget) == ("chunked", 512)
    assert args["priority"].colocated_prefill == "priority"
    # A scheduler switch is a new workload (surge rollout); a plan without one keeps its old name.
    assert names["priority"] != names["chunked"]
    [old] = [o for o in render_children(render_input(colocated_plan())) if o["kind"] == "StatefulSet"]
    assert old["metadata"]["name"] == names["priority"]


def test_every_child_is_owned_and_labelled():
    for obj in render_children(render_input(high_plan())):
        meta = obj["metadata"]
        assert meta["namespace"] == "serving"
        assert meta["ownerReferences"] == [OWNER.reference()]
        assert meta["ownerReferences"][0]["controller"] is True
        labels = meta["labels"]
        assert labels[lb.NAME] == "disagg" and labels[lb.INSTANCE] == "chat"
        assert labels[lb.MANAGED] == "disagg-operator" and labels[lb.PLAN_HASH] == "0123456789abcdef-analytic"
        assert labels[lb.COMPONENT]


def test_a_new_plan_hash_moves_no_selector_and_no_pod_template():
    a = _by_key(render_children(render_input(high_plan())))
    other = render_input(high_plan())
    b = _by_key(render_children(type(other)(owner=other.owner, spec=other.spec, plan=other.plan,
                                            plan_hash="feedfacefeedface-analytic")))
    for key in ("StatefulSet/chat-prefill", "StatefulSet/chat-decode", "Deployment/chat-router"):
        assert a[key]["metadata"]["name"] == b[key]["metadata"]["name"]
        assert a[key]["spec"]["selector"] == b[key]["spec"]["selector"]
        assert lb.PLAN_HASH not in a[key]["spec"]["selector"]["matchLabels"]
        # A template change restarts every pod: a plan that keeps the shapes must not touch them.
        assert a[key]["spec"]["template"] == b[key]["spec"]["template"], key
        assert a[key]["metadata"]["labels"][lb.PLAN_HASH] != b[key]["metadata"]["labels"][lb.PLAN_HASH]


def test_worker_names_follow_the_shape_not_the_replicas():
    base = high_plan()
    names = {child_key(o) for o in render_children(render_input(base))}
    more = base.model_copy(update={"prefill": base.prefill.model_copy(update={"replicas": 5})})
    assert {child_key(o) for o in render_children(render_input(more))} == names  # scaled in place
    wider = base.model_copy(update={"decode": base.decode.model_copy(update={"tp": 4, "pp": 1})})
    changed = {child_key(o) for o in render_children(render_input(wider))} ^ names
    # Only the decode group moves to new names; prefill keeps running as it is.
    assert {k.rsplit("-", 1)[0] for k in changed} == {"StatefulSet/chat-decode", "Service/chat-decode"}
    sts = _by_key(render_children(render_input(wider)))["StatefulSet/chat-decode"]
    shape = sts["metadata"]["labels"][lb.SHAPE]
    assert sts["spec"]["selector"]["matchLabels"][lb.SHAPE] == shape
    assert sts["spec"]["template"]["metadata"]["labels"][lb.SHAPE] == shape
    assert sts["spec"]["serviceName"] == sts["metadata"]["name"] == f"chat-decode-{shape}"


def test_retiring_endpoints_are_listed_after_the_plan_s_own():
    old = {"prefill": ["http://chat-prefill-aaaaaa-0.chat-prefill-aaaaaa.serving.svc:8000"],
           "decode": ["http://chat-decode-bbbbbb-0.chat-decode-bbbbbb.serving.svc:8001"]}
    inp = render_input(high_plan())
    plain = json.loads(_by_key(render_children(inp))["ConfigMap/chat-plan"]["data"]["endpoints.json"])
    both = json.loads(_by_key(render_children(replace(inp, retiring_endpoints=old)))["ConfigMap/chat-plan"]
                      ["data"]["endpoints.json"])
    assert both == {role: plain[role] + old[role] for role in ("prefill", "decode")}


@pytest.mark.parametrize(("plan", "over"), [(high_plan(), {}), (low_plan(), {}), (low_plan(), SMALL_NODES)],
                         ids=["high", "low-unit", "low-segments"])
def test_endpoints_read_back_from_a_statefulset_equal_the_rendered_ones(plan, over):
    # The reconciler reads the endpoints of an earlier plan's live StatefulSets with the same function.
    objs = render_children(render_input(plan, spec(**over)))
    listed = json.loads(_by_key(objs)["ConfigMap/chat-plan"]["data"]["endpoints.json"])
    read: dict[str, list[str]] = {}
    for obj in objs:
        if obj["kind"] == "StatefulSet":
            for role, urls in workload_endpoints(obj).items():
                read.setdefault(role, []).extend(urls)
    assert read == listed and set(read) == {"prefill", "decode"}


def test_statefulset_names_leave_room_for_the_pod_revision_label():
    objs = render_children(render_input(high_plan(), owner_name="x" * 40))
    names = [o["metadata"]["name"] for o in objs if o["kind"] == "StatefulSet"]
    assert names and all(len(n) <= 52 for n in names) and len(set(names)) == len(names)


def test_scheduling_gpu_selector_user_selector_and_tolerations():
    s = spec(scheduling={"nodeSelector": {"pool": "serving"},
                         "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    pod = _pod(_by_key(render_children(render_input(high_plan(), s)))["StatefulSet/chat-decode"])
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-80GB", "pool": "serving"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # The user's value for the GPU label wins (real nodes carry e.g. NVIDIA-A100-SXM4-80GB).
    s2 = spec(scheduling={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}})
    pod2 = _pod(_by_key(render_children(render_input(high_plan(), s2)))["StatefulSet/chat-decode"])
    assert pod2["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_cpu_cluster_requests_no_gpus_and_custom_gpu_resource_name():
    cpu = spec(model={"preset": "tiny-llama"}, cluster={"nodes": 1, "gpusPerNode": 8, "gpuType": "CPU"})
    pod = _pod(_by_key(render_children(render_input(high_plan(), cpu)))["StatefulSet/chat-prefill"])
    assert "resources" not in pod["containers"][0] and "nodeSelector" not in pod
    amd = spec(scheduling={"gpuResource": "amd.com/gpu"})
    pod = _pod(_by_key(render_children(render_input(high_plan(), amd)))["StatefulSet/chat-prefill"])
    assert pod["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "2"}


def test_config_map_carries_plan_model_and_router_endpoints():
    cm = _by_key(render_children(render_input(low_plan())))["ConfigMap/chat-plan"]
    assert json.loads(cm["data"]["plan.json"])["affinity"] == "low"
    assert json.loads(cm["data"]["model.json"])["name"] == "facebook/opt-13b"
    assert "profile.json" not in cm["data"]
    pod = _pod(_by_key(render_children(render_input(low_plan())))["StatefulSet/chat-unit"])
    assert pod["volumes"][0] == {"name": "plan", "configMap": {"name": "chat-plan"}}
    assert {"name": "plan", "mountPath": "/etc/disagg", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_image_pull_policy_and_model_path_reach_the_pods():
    s = spec(model={"preset": "opt-13b", "path": "/weights/opt"}, runtime={
        "image": "registry/rt:2", "kvCompression": "fp8", "maxPromptTokens": 2048, "prefillTokenBudget": 8192})
    objs = render_children(render_input(high_plan(), s, settings=RenderSettings(image_pull_policy="Always")))
    container = _pod(_by_key(objs)["StatefulSet/chat-prefill"])["containers"][0]
    assert container["image"] == "registry/rt:2" and container["imagePullPolicy"] == "Always"
    args = _runtime_args(container)
    assert (args.model_path, args.kv_compression, args.max_prompt_tokens, args.prefill_token_budget) == (
        "/weights/opt", "fp8", 2048, 8192)


def test_instances_larger_than_a_node_are_refused_with_a_fix():
    small_nodes = spec(cluster={"nodes": 4, "gpusPerNode": 2, "gpuType": "A100-80GB"})
    with pytest.raises(RenderError, match=r"decode pods need 4 GPUs but nodes have 2; lower search.maxTp"):
        render_children(render_input(high_plan(), small_nodes))


def test_unpaired_low_affinity_plan_is_refused():
    plan = low_plan().model_copy(update={"decode": low_plan().decode.model_copy(update={"replicas": 3})})
    with pytest.raises(RenderError, match="pair prefill and decode instances one to one"):
        render_children(render_input(plan))


def test_names_too_long_for_kubernetes_are_shortened_with_a_hash():
    from disagg_operator.labels import child_name

    name = child_name("x" * 60, "segment-s0", limit=52)
    assert len(name) <= 52 and name.endswith("-segment-s0")
    assert name != child_name("x" * 61, "segment-s0", limit=52)  # the hash keeps long names apart


def _launch_plan(container, args, pod_index="1"):
    """The runtime's own rank launcher reading the container's env (downward-API values filled in)."""
    from disagg_runtime.parallel.launcher import LaunchPlan

    env = {}
    for item in container.get("env", []):
        value = item.get("value")
        if value is None:  # fieldRef: what the kubelet would put there
            value = pod_index if item["name"] == "POD_INDEX" else "10.0.0.7"
        env[item["name"]] = value.replace("$(POD_INDEX)", env.get("POD_INDEX", ""))
    return LaunchPlan.from_env(args.tp * args.pp, tp=args.tp, stage=args.stage if args.pp > 1 else None, env=env)


def test_tp2_pp2_instance_in_one_pod_launches_its_four_ranks_locally():
    decode = _by_key(render_children(render_input(high_plan())))["StatefulSet/chat-decode"]
    container = _pod(decode)["containers"][0]
    args = _runtime_args(container)
    plan = _launch_plan(container, args)
    assert (args.tp, args.pp, _gpus(decode)["decode"]) == (2, 2, 4)
    assert (plan.world, plan.first_rank, plan.local_ranks, plan.master_addr) == (4, 0, 4, "127.0.0.1")
    assert plan.master_port == 29501 and "readinessProbe" in container


def test_tp2_pp2_stage_pods_find_rank_0_through_the_stage_0_service():
    s = spec(cluster={"nodes": 4, "gpusPerNode": 4, "gpuType": "A100-80GB"})
    plan = low_plan().model_copy(update={"decode": PhasePlan(tp=2, pp=2, replicas=2, instance_goodput_rps=2.5)})
    children = _by_key(render_children(render_input(plan, s)))
    s0, s1 = children["StatefulSet/chat-segment-s0"], children["StatefulSet/chat-segment-s1"]
    stage0 = s0["metadata"]["name"]
    assert s0["spec"]["serviceName"] == stage0 and children["Service/chat-segment-s0"]["spec"]["clusterIP"] == "None"
    for stage, sts in enumerate((s0, s1)):
        assert _gpus(sts) == {"prefill": 2, "decode": 2}
        for container in _pod(sts)["containers"]:
            args = _runtime_args(container)
            launch = _launch_plan(container, args)
            assert (args.tp, args.pp, args.stage) == (2, 2, stage)
            assert (launch.world, launch.first_rank, launch.local_ranks) == (4, 2 * stage, 2)
            assert launch.master_addr == f"{stage0}-1.{stage0}.serving.svc"
            assert launch.master_port == {"prefill": 29500, "decode": 29501}[args.role]
            assert ("readinessProbe" in container) == (stage == 0)  # later stages serve no HTTP
            if args.role == "prefill":
                assert args.advertise_host == "$(POD_IP)"  # expanded by the kubelet from status.podIP
    for version in K8S_VERSIONS:
        for obj in (s0, s1):
            kubernetes_validate.validate(obj, version, strict=True)
