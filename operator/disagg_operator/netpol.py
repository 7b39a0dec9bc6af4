"""NetworkPolicies of one DisaggServing: deny all ingress to its pods, then open exactly these paths.

| policy | pods | port | from |
| --- | --- | --- | --- |
| `<name>-np-default-deny` | every runtime pod | all | nobody |
| `<name>-np-router` | router | router (8000) | `networkPolicy.clients` (default: anyone; the router checks API keys) and Prometheus |
| `<name>-np-<role>-http` | prefill, decode, colocated (and paired) | the role's HTTP port, which serves /metrics too | the router's pods, Prometheus |
| `<name>-np-prefill-kv` | prefill (and paired) | kv (8100) | decode (and paired) pods of this DisaggServing |
| `<name>-np-kv-nccl` | prefill, decode, paired | all | each other; only when KV may move over NCCL |
| `<name>-np-ranks` | every worker pod | all | every worker pod; only when an instance has several ranks |

NCCL (`kvChannel: nccl`, or `auto` on GPUs, which picks NCCL across nodes) rendezvouses on a TCPStore
port the prefill end picks and opens its own connections in both directions on ephemeral ports, so
those pods reach each other on every port; docs/security.md says so. Likewise the ranks of a multi-GPU
instance: they rendezvous on a TCPStore, run collectives on ephemeral ports, and follower prefill ranks
serve their KV share on a port of their own. Egress is not restricted: the
pods resolve DNS and may download weights. Kubelet probes come from the node, which policies do not
govern on the common CNIs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from disagg_planner.api import DisaggServingSpec, PeerSelector

from . import labels as lb
from . import topology

if TYPE_CHECKING:
    from .render import RenderInput

PREFILL_PHASES = ("prefill", "paired")
DECODE_PHASES = ("decode", "paired")


def _pods(instance: str, phases: tuple[str, ...] | None = None, **match: str) -> dict[str, Any]:
    selector: dict[str, Any] = {"matchLabels": {**lb.pod_labels(instance), **match}}
    if phases:
        selector["matchExpressions"] = [{"key": lb.PHASE, "operator": "In", "values": list(phases)}]
    return selector


def _peer(selector: PeerSelector) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": dict(selector.namespace_selector)},
            "podSelector": {"matchLabels": dict(selector.pod_selector)}}


def _policy(meta: dict[str, Any], pods: dict[str, Any], ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress}}


def _tcp(port: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port}]


def network_policies(inp: RenderInput, meta: Callable[[str], dict[str, Any]], role_ports: dict[str, int],
                     kv_port: int) -> list[dict[str, Any]]:
    """The policies for `inp`; `meta(what)` gives the metadata of the policy named after `what`."""
    spec = inp.spec
    if not spec.network_policy.enabled:
        return []
    instance = inp.owner.name
    prometheus = _peer(spec.network_policy.prometheus)
    router_pods = {"podSelector": {"matchLabels": lb.selector_labels(instance, "router")}}
    clients = [_peer(spec.network_policy.clients), prometheus] if spec.network_policy.clients else []
    policies = [
        _policy(meta("default-deny"), _pods(instance), []),
        # An empty `from` is every source; with `clients` set, those and Prometheus only.
        _policy(meta("router"), _pods(instance, **{lb.COMPONENT: "router"}),
                [{"ports": _tcp(role_ports["router"]), **({"from": clients} if clients else {})}]),
    ]
    groups = topology.worker_groups(inp.plan, spec)
    phases = {g.phase for g in groups}
    roles = {"prefill": PREFILL_PHASES, "decode": DECODE_PHASES, "colocated": ("colocated",)}
    for role, role_phases in roles.items():
        present = tuple(p for p in role_phases if p in phases)
        if present:
            policies.append(_policy(meta(f"{role}-http"), _pods(instance, present),
                                    [{"from": [router_pods, prometheus], "ports": _tcp(role_ports[role])}]))
    prefill = tuple(p for p in PREFILL_PHASES if p in phases)
    decode = tuple(p for p in DECODE_PHASES if p in phases)
    if prefill and decode:
        policies.append(_policy(meta("prefill-kv"), _pods(instance, prefill),
                                [{"from": [{"podSelector": _pods(instance, decode)}], "ports": _tcp(kv_port)}]))
        if may_use_nccl(spec):
            both = tuple(sorted(set(prefill) | set(decode)))
            policies.append(_policy(meta("kv-nccl"), _pods(instance, both),
                                    [{"from": [{"podSelector": _pods(instance, both)}]}]))
    if any(seg.tp * seg.pp > 1 for g in groups for seg in g.segments):
        workers = tuple(sorted(phases))
        policies.append(_policy(meta("ranks"), _pods(instance, workers),
                                [{"from": [{"podSelector": _pods(instance, workers)}]}]))
    return policies


def may_use_nccl(spec: DisaggServingSpec) -> bool:
    """Whether a KV link of this deployment can be a collective one (see the module docstring)."""
    kind = spec.runtime.kv_channel
    return kind == "nccl" or (kind == "auto" and topology.uses_gpus(spec))
