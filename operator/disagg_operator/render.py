"""Render a plan into the child objects of one DisaggServing (plain dicts, ready for server-side apply).

Children, in apply order: ServiceAccount, ConfigMap (plan, model shape, latency profile), per worker
group a headless Service and a StatefulSet, then the router Deployment and its Service. Everything
carries the common labels and a controller owner reference, so a real cluster's garbage collector
removes the children with their owner.

Runtime contract (`disagg serve`, runtime/disagg_runtime/serve/options.py): workers get `--role
prefill|decode`, `--model-path` (or, without one, `--model-spec model.json`: random weights of the
shape), `--tp`, `--pp`, `--stage` (a pipeline stage of a multi-node low-affinity instance), `--port`,
`--kv-channel`, `--kv-compression`, `--prefill-token-budget`, `--max-prompt-tokens`, and prefill a
fixed `--kv-port`; the router gets `--endpoints-file endpoints.json`, per-pod URLs through the
headless Services, which it re-reads, so a re-plan reaches it without a restart. The ConfigMap is
mounted at /etc/disagg: `plan.json`, `model.json`, `endpoints.json` and, when planning used one,
`profile.json`. A colocated plan renders `--role colocated` workers, listed under `colocated`; with
chunked prefill they also get `--colocated-prefill chunked --chunk-token-budget N` from the plan.

Worker groups are named after their shape (`<instance>-<component>-<shape>`, see topology.py). While
a rollout runs, `RenderInput.retiring_endpoints` (the pods of earlier plans' workloads that still
serve) are listed in `endpoints.json` beside the new plan's, so the router uses both.

Security (security_context.py, credentials.py, netpol.py): every pod meets the restricted Pod Security
Standard and mounts the internal token, whose rotation names the worker workloads (a rotation rolls out
like a new shape; the router re-reads the token in place). The router also mounts the users' API keys
when the spec names them. The NetworkPolicies come last.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from disagg_planner.api import DisaggServingSpec, LatencyProfile, Plan

from . import labels as lb
from . import rendezvous, topology
from .credentials import TokenRef, add_api_keys, add_internal_token
from .netpol import network_policies
from .security_context import restrict
from .topology import Segment, WorkerGroup

CONFIG_DIR = "/etc/disagg"
ROLE_PORTS = {"prefill": 8000, "decode": 8001, "colocated": 8000, "router": 8000}
KV_PORT = 8100  # prefill's KV server, which decode workers pull from (fixed: network policies can name it)


@dataclass(frozen=True)
class Owner:
    """The DisaggServing that owns the children."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


@dataclass(frozen=True)
class RenderSettings:
    """Operator-wide knobs (from its command line), not per resource."""

    gpu_product_label: str = "nvidia.com/gpu.product"
    image_pull_policy: str = "IfNotPresent"


@dataclass(frozen=True)
class RenderInput:
    """Everything one render needs."""

    owner: Owner
    spec: DisaggServingSpec
    plan: Plan
    plan_hash: str
    profile: LatencyProfile | None = None
    settings: RenderSettings = RenderSettings()
    retiring_endpoints: Mapping[str, list[str]] = field(default_factory=dict)
    internal_token: TokenRef | None = None  # the operator-owned token Secret; None renders pods without one


def render_children(inp: RenderInput) -> list[dict[str, Any]]:
    """All children for one plan, in apply order."""
    workers: list[dict[str, Any]] = []
    revision = inp.internal_token.revision if inp.internal_token else ""
    for group in topology.worker_groups(inp.plan, inp.spec):
        group = replace(group, revision=revision)
        workers.append(_headless_service(inp, group))
        workers.append(_stateful_set(inp, group))
    statefulsets = [w for w in workers if w["kind"] == "StatefulSet"]
    policies = network_policies(inp, lambda what: _meta(inp, lb.child_name(inp.owner.name, f"np-{what}"),
                                                        "network-policy"), ROLE_PORTS, KV_PORT)
    return [_service_account(inp), _config_map(inp, statefulsets), *workers, _router_deployment(inp),
            _router_service(inp), *policies]


def child_key(obj: dict[str, Any]) -> str:
    """`Kind/name`, as listed in the status."""
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _meta(inp: RenderInput, name: str, component: str, phase: str | None = None) -> dict[str, Any]:
    labels = {**lb.common_labels(inp.owner.name, inp.plan_hash), lb.COMPONENT: component}
    if phase:
        labels[lb.PHASE] = phase
    return {"name": name, "namespace": inp.owner.namespace, "labels": labels,
            "ownerReferences": [inp.owner.reference()]}


def _service_account(inp: RenderInput) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(inp, lb.child_name(inp.owner.name, "runtime"), "runtime"),
            # The runtime never talks to the API server; no token in its pods.
            "automountServiceAccountToken": False}


def _config_name(inp: RenderInput) -> str:
    return lb.child_name(inp.owner.name, "plan")


def _config_map(inp: RenderInput, statefulsets: list[dict[str, Any]]) -> dict[str, Any]:
    data = {
        "plan.json": json.dumps(inp.plan.to_wire(), sort_keys=True, indent=1),
        "model.json": json.dumps(inp.spec.model.spec.to_wire(), sort_keys=True, indent=1),
        "endpoints.json": json.dumps(router_endpoints(statefulsets, inp.retiring_endpoints), sort_keys=True,
                                     indent=1),
    }
    if inp.profile is not None:
        data["profile.json"] = inp.profile.model_dump_json(by_alias=True)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(inp, _config_name(inp), "config"),
            "data": data}


def router_endpoints(statefulsets: list[Mapping[str, Any]],
                     retiring: Mapping[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The router's endpoint list: the plan's worker pods first, then those of `retiring` workloads."""
    out: dict[str, list[str]] = {}
    for sts in statefulsets:
        merge_endpoints(out, workload_endpoints(sts))
    return merge_endpoints(out, retiring or {})


def merge_endpoints(into: dict[str, list[str]], more: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Append `more` to `into` per role, skipping URLs already there; returns `into`."""
    for role, urls in more.items():
        listed = into.setdefault(role, [])
        listed.extend(u for u in urls if u not in listed)
    return into


def workload_endpoints(sts: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per-pod URLs one worker StatefulSet gives the router, by role (a pipelined instance enters at
    stage 0). Read from the object itself, so it serves rendered and live (earlier plans') ones alike."""
    meta, spec = sts["metadata"], sts.get("spec") or {}
    name, service = meta["name"], spec.get("serviceName") or meta["name"]
    replicas = int(spec.get("replicas", 1))
    out: dict[str, list[str]] = {}
    for container in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
        role = container.get("name")
        if role not in ("prefill", "decode", "colocated") or _stage_arg(container.get("args") or []) not in (None, 0):
            continue
        port = next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == role),
                    ROLE_PORTS[role])
        out.setdefault(role, []).extend(
            f"http://{name}-{i}.{service}.{meta.get('namespace')}.svc:{port}" for i in range(replicas))
    return out


def _stage_arg(args: list[str]) -> int | None:
    if "--stage" in args[:-1]:
        value = args[args.index("--stage") + 1]
        return int(value) if value.isdigit() else None
    return None


def _worker_meta(inp: RenderInput, group: WorkerGroup) -> dict[str, Any]:
    meta = _meta(inp, lb.worker_name(inp.owner.name, group.component, group.shape_id), group.component,
                 group.phase)
    meta["labels"][lb.SHAPE] = group.shape_id
    return meta


def _headless_service(inp: RenderInput, group: WorkerGroup) -> dict[str, Any]:
    ports = [{"name": seg.role, "port": ROLE_PORTS[seg.role], "targetPort": seg.role} for seg in group.segments]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _worker_meta(inp, group),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "ports": ports,
                     "selector": lb.selector_labels(inp.owner.name, group.component, group.shape_id)}}


def _stateful_set(inp: RenderInput, group: WorkerGroup) -> dict[str, Any]:
    meta = _worker_meta(inp, group)
    name = meta["name"]
    selector = lb.selector_labels(inp.owner.name, group.component, group.shape_id)
    pod_labels = {**lb.pod_labels(inp.owner.name), **selector, lb.PHASE: group.phase}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": lb.child_name(inp.owner.name, "runtime"),
        "containers": [_worker_container(inp, seg, _stage0_service(inp, group)) for seg in group.segments],
        "volumes": _volumes(inp),
        "topologySpreadConstraints": topology.spread_constraints(selector),
    }
    _add_scheduling(inp, pod_spec)
    template_meta = {"labels": pod_labels, "annotations": _scrape(group.segments[0].role)}
    _secure(inp, pod_spec, template_meta, gpus=group.gpus_per_pod if topology.uses_gpus(inp.spec) else 0)
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
        "spec": {
            "serviceName": name,
            "replicas": group.replicas,
            # Instances are independent; ordered start would serialise minutes-long model loads.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def _secure(inp: RenderInput, pod_spec: dict[str, Any], template_meta: dict[str, Any] | None, *, gpus: int) -> None:
    """Restricted pods with the internal token; `template_meta` (workers only) carries the token's version."""
    if inp.internal_token is not None:
        add_internal_token(pod_spec, template_meta, inp.internal_token)
    restrict(pod_spec, gpus=gpus)


def _stage0_service(inp: RenderInput, group: WorkerGroup) -> str | None:
    """The headless Service (and StatefulSet) name of the stage-0 segment pods of `group`'s instances."""
    if all(seg.stage is None for seg in group.segments):
        return None
    stage0 = WorkerGroup(component="segment-s0", phase=group.phase, replicas=group.replicas,
                         segments=tuple(dataclasses.replace(seg, stage=0) for seg in group.segments))
    return lb.worker_name(inp.owner.name, stage0.component, stage0.shape_id)


def _worker_container(inp: RenderInput, seg: Segment, stage0_service: str | None = None) -> dict[str, Any]:
    rt = inp.spec.runtime
    weights = (["--model-path", inp.spec.model.path] if inp.spec.model.path
               else ["--model-spec", f"{CONFIG_DIR}/model.json"])
    args = ["serve", "--role", seg.role, *weights, "--tp", str(seg.tp), "--pp", str(seg.pp),
            "--port", str(ROLE_PORTS[seg.role]), "--kv-channel", rt.kv_channel,
            "--kv-compression", rt.kv_compression, "--prefill-token-budget", str(rt.prefill_token_budget)]
    if rt.max_prompt_tokens:
        args += ["--max-prompt-tokens", str(rt.max_prompt_tokens)]
    if seg.role == "prefill":
        args += ["--kv-port", str(KV_PORT)]
    if seg.scheduler is not None:  # colocated chunked prefill (topology.worker_groups)
        args += ["--colocated-prefill", "chunked", "--chunk-token-budget", seg.scheduler.removeprefix("chunked-")]
    if seg.stage is not None:
        args += ["--stage", str(seg.stage)]
    args += rendezvous.rank_args(seg)
    container = _container(inp, seg.role, args)
    env = rendezvous.rank_env(seg, stage0_service, inp.owner.namespace)
    if env:
        container["env"] = env
    if not rendezvous.serves_http(seg):
        del container["readinessProbe"]  # its ranks follow rank 0's pod and serve no HTTP
    if seg.role == "prefill":
        container["ports"].append({"name": "kv", "containerPort": KV_PORT, "protocol": "TCP"})
    if topology.uses_gpus(inp.spec):
        gpus = {inp.spec.scheduling.gpu_resource: str(seg.gpus)}
        container["resources"] = {"requests": dict(gpus), "limits": dict(gpus)}
    return container


def _container(inp: RenderInput, role: str, args: list[str]) -> dict[str, Any]:
    port = ROLE_PORTS[role]
    return {
        "name": role,
        "image": inp.spec.runtime.image,
        "imagePullPolicy": inp.settings.image_pull_policy,
        "command": ["disagg"],
        "args": args,
        "ports": [{"name": role, "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": role}, "periodSeconds": 5},
        "volumeMounts": [{"name": "plan", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _volumes(inp: RenderInput) -> list[dict[str, Any]]:
    return [{"name": "plan", "configMap": {"name": _config_name(inp)}},
            # NCCL and CUDA IPC need more shared memory than the container runtime's 64 MiB default.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def _scrape(role: str) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(ROLE_PORTS[role]),
            "prometheus.io/path": "/metrics"}


def _add_scheduling(inp: RenderInput, pod_spec: dict[str, Any]) -> None:
    selector = topology.node_selector(inp.spec, inp.settings.gpu_product_label)
    if selector:
        pod_spec["nodeSelector"] = selector
    tolerations = topology.tolerations(inp.spec)
    if tolerations:
        pod_spec["tolerations"] = tolerations


def _router_deployment(inp: RenderInput) -> dict[str, Any]:
    name = lb.child_name(inp.owner.name, "router")
    selector = lb.selector_labels(inp.owner.name, "router")
    pod_labels = {**lb.pod_labels(inp.owner.name), **selector, lb.PHASE: "router"}
    args = ["serve", "--role", "router", "--port", str(ROLE_PORTS["router"]),
            "--endpoints-file", f"{CONFIG_DIR}/endpoints.json"]
    if inp.spec.runtime.max_prompt_tokens:
        args += ["--max-prompt-tokens", str(inp.spec.runtime.max_prompt_tokens)]
    if inp.spec.model.path:  # same image as the workers: the router reads the model's chat template there
        args += ["--model-path", inp.spec.model.path]
    container = _container(inp, "router", args)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": lb.child_name(inp.owner.name, "runtime"),
        "containers": [container],
        "volumes": _volumes(inp)[:1],
    }
    container["volumeMounts"] = container["volumeMounts"][:1]
    if inp.spec.scheduling.tolerations:
        pod_spec["tolerations"] = topology.tolerations(inp.spec)
    template_meta = {"labels": pod_labels, "annotations": _scrape("router")}
    add_api_keys(pod_spec, inp.spec.router)
    _secure(inp, pod_spec, None, gpus=0)  # the router re-reads a rotated token: no restart (credentials.py)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(inp, name, "router", "router"),
        "spec": {"replicas": inp.spec.runtime.router_replicas, "selector": {"matchLabels": selector},
                 "template": {"metadata": template_meta, "spec": pod_spec}},
    }


def _router_service(inp: RenderInput) -> dict[str, Any]:
    # Named after the DisaggServing itself: the one address clients use.
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(inp, lb.service_name(inp.owner.name), "router", "router"),
            "spec": {"type": "ClusterIP", "selector": lb.selector_labels(inp.owner.name, "router"),
                     "ports": [{"name": "http", "port": 80, "targetPort": "router", "protocol": "TCP"}]}}
