"""Progressing <-> Ready, driven by the events of the operator's own workloads.

The reconcile already records readiness when it applies; this module covers what happens later
(pods start, crash, get evicted) without a timer. It writes the owner's status directly with the
resourceVersion it read, so it can never overwrite a newer reconcile's status: on a conflict it
gives way, and the next workload event looks again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from . import reporting
from .errors import KubeApiError
from .kube import KINDS, KubeClient
from .reconcile import DISAGG_KIND, is_ready, owner_of
from .status import Phase

_WORKLOADS = ("StatefulSet", "Deployment")


async def workloads_ready(kube: KubeClient, body: Mapping[str, Any]) -> bool | None:
    """Whether every workload of the applied plan is ready; None when none was applied yet."""
    owner = owner_of(body)
    children = (body.get("status") or {}).get("children") or []
    workloads = [key.split("/", 1) for key in children if key.split("/", 1)[0] in _WORKLOADS]
    if not workloads:
        return None
    lives = await asyncio.gather(*(kube.get(KINDS[kind], owner.namespace, name) for kind, name in workloads))
    return all(live is not None and is_ready(live) for live in lives)


async def refresh_readiness(kube: KubeClient, namespace: str, name: str) -> tuple[Phase, dict[str, Any]] | None:
    """Re-evaluate one DisaggServing's readiness; returns (new phase, resource) when the phase moved."""
    cr = await kube.get(DISAGG_KIND, namespace, name)
    if cr is None:
        return None
    prev = reporting.previous_status(cr)
    generation = cr.get("metadata", {}).get("generation")
    if prev.phase not in ("Progressing", "Ready") or prev.observed_generation != generation:
        return None  # not rolled out, or a reconcile of a newer spec is due and will decide
    ready = await workloads_ready(kube, cr)
    if ready is None or (prev.phase == "Ready") == ready:
        return None
    status = reporting.readiness_status(prev, ready, generation)
    try:
        await kube.patch_status(DISAGG_KIND, namespace, name, reporting.to_patch(status),
                                resource_version=cr["metadata"].get("resourceVersion"))
    except KubeApiError as exc:
        if exc.status in (404, 409):
            return None
        raise
    return status.phase, cr
