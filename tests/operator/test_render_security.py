"""Rendered children, from a security reviewer's side: restricted pods, credentials in every pod, and
NetworkPolicies that admit exactly the router -> workers, decode -> prefill KV and Prometheus paths."""

from __future__ import annotations

import argparse
import base64
import copy

import kubernetes_validate
import pytest
from disagg_operator import labels as lb
from disagg_operator.credentials import TOKEN_VERSION_ANNOTATION, TokenRef
from disagg_operator.render import render_children
from disagg_operator.token_secret import stored_tokens, token_secret, token_version
from disagg_planner.api import PhasePlan
from disagg_runtime.serve.options import add_serve_arguments, check_serve_arguments
from netpol_eval import Pod, admits
from operator_plans import OWNER, colocated_plan, high_plan, low_plan, render_input, spec
from pss import violations

TOKEN = TokenRef("chat-internal-token", "0123456789abcdef")
SMALL_NODES = {"cluster": {"nodes": 4, "gpusPerNode": 4, "gpuType": "A100-80GB"}}
CPU = {"cluster": {"nodes": 1, "gpusPerNode": 4, "gpuType": "CPU"}}
KEYS = {"router": {"apiKeySecretRef": {"name": "chat-api-keys", "key": "keys.txt"}, "metricsRequireKey": True}}
LAYOUTS = [(high_plan(), {}), (low_plan(), {}), (low_plan(), SMALL_NODES), (colocated_plan(), {}),
           (high_plan(), CPU), (high_plan(), KEYS)]
IDS = ["high", "low-unit", "low-segments", "colocated", "cpu", "api-keys"]


def _children(plan, over=None, token=TOKEN):
    return render_children(render_input(plan, spec(**(over or {})), internal_token=token))


def _workloads(children):
    return [o for o in children if o["kind"] in ("StatefulSet", "Deployment")]


def _args(container):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(container["args"][1:])
    check_serve_arguments(args)
    return args


@pytest.mark.parametrize(("plan", "over"), LAYOUTS, ids=IDS)
def test_every_child_validates_against_the_kubernetes_schema(plan, over):
    for obj in _children(plan, over):
        kubernetes_validate.validate(obj, "1.33", strict=True)


@pytest.mark.parametrize(("plan", "over"), LAYOUTS, ids=IDS)
def test_every_pod_meets_the_restricted_pod_security_standard(plan, over):
    for obj in _workloads(_children(plan, over)):
        template = obj["spec"]["template"]
        pod = template["spec"]
        assert violations(pod, template["metadata"]) == [], obj["metadata"]["name"]
        assert pod.get("hostIPC") is not True and not pod.get("hostNetwork") and not pod.get("hostPID")
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            env = {e["name"]: e.get("value") for e in c["env"]}
            # Everything the runtime writes lands on an emptyDir.
            for var in ("HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR", "DISAGG_CACHE"):
                assert any(env[var] == d or env[var].startswith(d + "/") for d in writable), var


@pytest.mark.parametrize(("plan", "over", "shm"), [(high_plan(), {}, {"prefill": "3Gi", "decode": "5Gi"}),
                                                   (low_plan(), {}, {"unit": "7Gi"}),
                                                   (high_plan(), CPU, {"prefill": "1Gi", "decode": "1Gi"})])
def test_dev_shm_is_a_memory_emptydir_sized_from_the_pods_gpus(plan, over, shm):
    got = {}
    for obj in _children(plan, over):
        if obj["kind"] == "StatefulSet":
            pod = obj["spec"]["template"]["spec"]
            [volume] = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert volume["emptyDir"]["medium"] == "Memory"
            assert all({"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"] for c in pod["containers"])
            got[obj["metadata"]["labels"][lb.COMPONENT]] = volume["emptyDir"]["sizeLimit"]
    assert got == shm


def test_the_checker_catches_what_the_standard_forbids():
    pod = next(o for o in _workloads(_children(high_plan())))["spec"]["template"]["spec"]
    broken = [
        ("hostIPC", lambda p: p.update(hostIPC=True)),
        ("hostPath", lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("runAsUser 0", lambda p: p["containers"][0]["securityContext"].update(runAsUser=0)),
        ("allowPrivilegeEscalation", lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
        ("drop ALL", lambda p: p["containers"][0]["securityContext"].update(capabilities={"add": ["NET_ADMIN"]})),
        ("seccompProfile", lambda p: (p["securityContext"].pop("seccompProfile"),
                                      p["containers"][0]["securityContext"].pop("seccompProfile"))),
        ("privileged", lambda p: p["containers"][0]["securityContext"].update(privileged=True)),
        ("hostPort", lambda p: p["containers"][0]["ports"][0].update(hostPort=80)),
        ("sysctl", lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
        ("runAsNonRoot", lambda p: (p["securityContext"].pop("runAsNonRoot"),
                                    p["containers"][0]["securityContext"].pop("runAsNonRoot"))),
    ]
    for what, breaks in broken:
        bad = copy.deepcopy(pod)
        breaks(bad)
        assert any(what.split()[0] in v for v in violations(bad)), what


@pytest.mark.parametrize(("plan", "over"), LAYOUTS, ids=IDS)
def test_every_pod_mounts_the_internal_token_and_the_router_the_api_keys(plan, over):
    for obj in _workloads(_children(plan, over)):
        template = obj["spec"]["template"]
        annotations = template["metadata"].get("annotations") or {}
        assert annotations.get(TOKEN_VERSION_ANNOTATION) == (TOKEN.version if obj["kind"] == "StatefulSet" else None)
        [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "internal-token"]
        assert volume["secret"]["secretName"] == TOKEN.secret_name
        for c in template["spec"]["containers"]:
            args = _args(c)
            assert args.internal_token_file == "/var/run/secrets/disagg/internal-token/tokens"
            if c["name"] == "router" and "router" in over:
                assert args.api_key_file == "/var/run/secrets/disagg/api-keys/keys" and args.metrics_require_key
                [keys] = [v for v in template["spec"]["volumes"] if v["name"] == "api-keys"]
                assert keys["secret"] == {"secretName": "chat-api-keys", "defaultMode": 0o440,
                                          "items": [{"key": "keys.txt", "path": "keys"}]}
            else:
                assert args.api_key_file is None
            # Secrets are files, never environment variables or arguments.
            assert not any("secretKeyRef" in (e.get("valueFrom") or {}) for e in c["env"])


def test_a_rotation_renames_the_workers_and_leaves_the_router_running():
    before = {o["metadata"]["name"]: o for o in _workloads(_children(high_plan()))}
    rotated = TokenRef(TOKEN.secret_name, "fedcba9876543210", rotation=1)
    after = {o["metadata"]["name"]: o for o in _workloads(_children(high_plan(), token=rotated))}
    workers = lambda names: {n for n in names if n != "chat-router"}  # noqa: E731
    assert workers(before).isdisjoint(workers(after)) and len(workers(after)) == 2
    for obj in after.values():
        if obj["kind"] == "StatefulSet":
            assert obj["spec"]["template"]["metadata"]["annotations"][TOKEN_VERSION_ANNOTATION] == "fedcba9876543210"
    # The router re-reads the mounted token: its template (and so its pods) stay as they were.
    assert after["chat-router"]["spec"]["template"] == before["chat-router"]["spec"]["template"]


def test_token_secret_round_trip_and_version_reveal_nothing():
    secret = token_secret(OWNER, "h", 3, ["new-token", "old-token"])
    assert stored_tokens(secret) == ["new-token", "old-token"]
    assert base64.b64decode(secret["data"]["tokens"]).decode() == "new-token\nold-token\n"
    assert secret["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert secret["metadata"]["annotations"]["disagg.io/token-rotation"] == "3"
    assert "new-token" not in token_version("new-token") and token_version("a") != token_version("b")
    assert stored_tokens(None) == [] and stored_tokens({"data": {"tokens": "%%%"}}) == []


# ---- NetworkPolicies ------------------------------------------------------------------------------

NS = OWNER.namespace
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


def _pods(children):
    """A pod per workload, with its template's labels and named ports."""
    out = {}
    for obj in _workloads(children):
        template = obj["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        out[obj["metadata"]["labels"][lb.COMPONENT]] = Pod(template["metadata"]["labels"], NS,
                                                           {"kubernetes.io/metadata.name": NS}, ports)
    return out


def _policies(children):
    return [o for o in children if o["kind"] == "NetworkPolicy"]


PROMETHEUS = Pod({"app.kubernetes.io/name": "prometheus"}, "monitoring", MONITORING)
STRANGER = Pod({"app": "curl"}, NS, {"kubernetes.io/metadata.name": NS})
OTHER_NS = Pod({"app": "curl"}, "team-b", {"kubernetes.io/metadata.name": "team-b"})


def _single_rank_plan():
    return high_plan().model_copy(update={"gpus": 4,
                                          "prefill": PhasePlan(tp=1, pp=1, replicas=3, instance_goodput_rps=2.0),
                                          "decode": PhasePlan(tp=1, pp=1, replicas=1, instance_goodput_rps=6.0)})


def test_multi_rank_instances_reach_each_other_on_every_port():
    children = _children(high_plan(), {"runtime": {"kvChannel": "tcp"}})  # tp2 instances
    policies, pods = _policies(children), _pods(children)
    assert "chat-np-ranks" in {p["metadata"]["name"] for p in policies}
    assert admits(policies, pods["decode"], pods["prefill"], 29500) and admits(policies, pods["prefill"], pods["decode"], 41000)
    assert not admits(policies, pods["router"], pods["prefill"], 29500) and not admits(policies, STRANGER, pods["decode"], 29501)
    assert "chat-np-ranks" not in {p["metadata"]["name"] for p in _policies(_children(_single_rank_plan()))}


@pytest.mark.parametrize("kv_channel", ["tcp", "auto"])
def test_high_affinity_policies_admit_only_the_intended_paths(kv_channel):
    children = _children(_single_rank_plan(), {"runtime": {"kvChannel": kv_channel}})
    policies, pods = _policies(children), _pods(children)
    router, prefill, decode = pods["router"], pods["prefill"], pods["decode"]
    other_decode = Pod({**decode.labels, lb.INSTANCE: "other"}, NS, decode.namespace_labels)
    assert {p["metadata"]["name"] for p in policies} >= {
        "chat-np-default-deny", "chat-np-router", "chat-np-prefill-http", "chat-np-decode-http", "chat-np-prefill-kv"}
    for p in policies:
        assert p["metadata"]["ownerReferences"] == [OWNER.reference()]
    allowed = [
        (router, prefill, 8000), (router, decode, 8001),  # the router reaches the workers' HTTP ports
        (decode, prefill, 8100),  # decode pulls KV
        (PROMETHEUS, prefill, 8000), (PROMETHEUS, decode, 8001), (PROMETHEUS, router, 8000),  # scrapes
        (STRANGER, router, 8000), (OTHER_NS, router, 8000),  # clients (the router checks API keys)
    ]
    denied = [
        (STRANGER, prefill, 8000), (STRANGER, decode, 8001), (STRANGER, prefill, 8100),
        (OTHER_NS, prefill, 8100), (OTHER_NS, decode, 8001),
        (other_decode, prefill, 8100),  # another DisaggServing's decode pods
        (router, prefill, 8100),  # the router never needs KV
        (PROMETHEUS, prefill, 8100),
        (Pod(PROMETHEUS.labels, NS, {"kubernetes.io/metadata.name": NS}), prefill, 8000),  # wrong namespace
        (prefill, decode, 8001), (decode, decode, 8001), (prefill, router, 9999),
    ]
    for src, dst, port in allowed:
        assert admits(policies, src, dst, port), (src, dst, port)
    for src, dst, port in denied:
        if kv_channel == "auto" and {src.labels.get(lb.PHASE), dst.labels.get(lb.PHASE)} <= {"prefill", "decode"} \
                and src.labels.get(lb.INSTANCE) == "chat":
            continue  # NCCL: paired prefill and decode pods reach each other on every port
        assert not admits(policies, src, dst, port), (src, dst, port)
    nccl = [p for p in policies if p["metadata"]["name"] == "chat-np-kv-nccl"]
    assert bool(nccl) == (kv_channel == "auto")  # A100s: auto picks NCCL across nodes
    if nccl:
        assert admits(policies, prefill, decode, 40123) and admits(policies, decode, prefill, 29500)
        assert not admits(policies, router, decode, 40123)


def test_colocated_and_paired_layouts_and_a_configured_prometheus():
    over = {"networkPolicy": {"prometheus": {"namespaceSelector": {"team": "obs"}, "podSelector": {"app": "vm"}},
                              "clients": {"namespaceSelector": {"team": "apps"}, "podSelector": {}}},
            "runtime": {"kvChannel": "tcp"}}
    children = _children(colocated_plan(), over)
    policies, pods = _policies(children), _pods(children)
    scraper = Pod({"app": "vm"}, "obs", {"team": "obs"})
    client = Pod({"app": "web"}, "shop", {"team": "apps"})
    assert admits(policies, pods["router"], pods["colocated"], 8000)
    assert admits(policies, scraper, pods["colocated"], 8000) and not admits(policies, PROMETHEUS, pods["colocated"], 8000)
    assert admits(policies, client, pods["router"], 8000) and admits(policies, scraper, pods["router"], 8000)
    assert not admits(policies, STRANGER, pods["router"], 8000) and not admits(policies, STRANGER, pods["colocated"], 8000)
    assert not any(p["metadata"]["name"].endswith(("prefill-kv", "kv-nccl")) for p in policies)

    paired = _children(low_plan(), {"runtime": {"kvChannel": "tcp"}})
    policies, pods = _policies(paired), _pods(paired)
    unit, router = pods["unit"], pods["router"]
    assert admits(policies, router, unit, 8000) and admits(policies, router, unit, 8001)
    assert admits(policies, unit, unit, 8100)
    assert admits(policies, unit, unit, 29500)  # pp2 instances: the stages' ranks rendezvous across pods
    assert not admits(policies, STRANGER, unit, 8100) and not admits(policies, router, unit, 29500)


def test_network_policies_can_be_turned_off():
    children = _children(high_plan(), {"networkPolicy": {"enabled": False}})
    assert not _policies(children)
