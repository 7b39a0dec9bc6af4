"""Surge rollout of a new plan: the children of earlier plans that keep serving, and those that go now.

A plan that changes a worker group's shape renders a workload under a new name (topology.py). The
reconciler applies the new plan's children first and sorts the rest of the live children with
`sort_stale`:

- *retiring*: a StatefulSet of an earlier plan with at least one ready pod, with its headless
  Service (the pods' DNS names). They keep serving, listed in the router's endpoints beside the new
  plan's pods, until every workload of the new plan is ready; then the router's list drops them and
  they are deleted. Capacity never falls below what was serving.
- *prune*: everything else that the plan no longer has (a workload with no ready pod serves nothing,
  e.g. an intermediate plan superseded before it came up), deleted at once.

A plan that keeps every shape and only changes replica counts (or a spec change that does not touch
the plan, such as the image) updates the running workloads in place; Kubernetes' own rolling update
then replaces pods one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .render import merge_endpoints, workload_endpoints


@dataclass(frozen=True)
class Stale:
    """Live children that the current plan does not render, by what happens to them (`Kind/name` keys)."""

    retiring: tuple[str, ...] = ()
    prune: tuple[str, ...] = ()


def ready_replicas(obj: Mapping[str, Any]) -> int:
    return int((obj.get("status") or {}).get("readyReplicas") or 0)


def sort_stale(live: Mapping[str, Mapping[str, Any]], desired: set[str]) -> Stale:
    """Split the owned live children (`Kind/name` -> object) that are not in `desired`."""
    stale = {key: obj for key, obj in live.items() if key not in desired}
    retiring: set[str] = set()
    for key, obj in stale.items():
        if obj.get("kind") == "StatefulSet" and ready_replicas(obj) > 0:
            retiring.add(key)
            service = f"Service/{(obj.get('spec') or {}).get('serviceName') or obj['metadata']['name']}"
            if service in stale:
                retiring.add(service)
    return Stale(retiring=tuple(sorted(retiring)), prune=tuple(sorted(set(stale) - retiring)))


def retiring_endpoints(live: Mapping[str, Mapping[str, Any]], retiring: tuple[str, ...]) -> dict[str, list[str]]:
    """The router URLs of the retiring StatefulSets' pods, by role."""
    out: dict[str, list[str]] = {}
    for key in retiring:
        if key.startswith("StatefulSet/"):
            merge_endpoints(out, workload_endpoints(live[key]))
    return out
