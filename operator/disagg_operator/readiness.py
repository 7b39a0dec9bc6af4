"""Progressing <-> Ready, and rollouts carried forward, driven by the events of the operator's workloads.

The reconcile records readiness when it applies; this module covers what happens later (pods start,
crash, get evicted) without a timer:

- while a rollout runs (`status.retiring` is set), a workload event reconciles the resource again:
  once every workload of the new plan is ready, that reconcile drops the previous plan's pods from
  the router's list and deletes their workloads (rollout.py);
- otherwise only the phase and the rollout conditions move.

Both hold the resource's lock (locks.py) from reading it to writing its status, and act only on a
status that is current (observedGeneration == generation): a spec the create/update handler has not
handled yet is that handler's to roll out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disagg_planner.errors import PlannerError

from . import reporting
from .errors import KubeApiError, OperatorError
from .kube import KINDS, KubeClient
from .reconcile import DISAGG_KIND, Reconciler, is_ready, owner_of
from .status import Phase

_WORKLOADS = ("StatefulSet", "Deployment")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Moved:
    """A resource whose phase changed, or whose rollout retired the previous plan's children."""

    phase: Phase
    resource: dict[str, Any]
    message: str


async def workloads_ready(kube: KubeClient, body: Mapping[str, Any]) -> bool | None:
    """Whether every workload of the applied plan is ready; None when none was applied yet."""
    owner = owner_of(body)
    children = (body.get("status") or {}).get("children") or []
    workloads = [key.split("/", 1) for key in children if key.split("/", 1)[0] in _WORKLOADS]
    if not workloads:
        return None
    lives = await asyncio.gather(*(kube.get(KINDS[kind], owner.namespace, name) for kind, name in workloads))
    return all(live is not None and is_ready(live) for live in lives)


async def refresh_readiness(reconciler: Reconciler, namespace: str, name: str) -> Moved | None:
    """Re-evaluate one DisaggServing after an event of one of its workloads; says what moved, if anything."""
    async with reconciler.exclusive(namespace, name):
        cr = await reconciler.kube.get(DISAGG_KIND, namespace, name)
        if cr is None:
            return None
        prev = reporting.previous_status(cr)
        generation = cr.get("metadata", {}).get("generation")
        if prev.phase not in ("Progressing", "Ready") or prev.observed_generation != generation:
            return None  # not rolled out, or a reconcile of a newer spec is due and will decide
        if prev.retiring:
            return await _carry_rollout(reconciler, cr, generation)
        ready = await workloads_ready(reconciler.kube, cr)
        if ready is None or (prev.phase == "Ready") == ready:
            return None
        status = reporting.readiness_status(prev, ready, generation)
        if not await _write(reconciler.kube, cr, reporting.to_patch(status)):
            return None
        return Moved(status.phase, cr, "all workloads ready" if ready else "workloads are missing ready replicas")


async def _carry_rollout(reconciler: Reconciler, cr: dict[str, Any], generation: int | None) -> Moved | None:
    prev = reporting.previous_status(cr)
    try:
        outcome = await reconciler.reconcile(cr)
    except (OperatorError, PlannerError) as exc:
        # The next create/update/resume reports it (Degraded); the previous plan keeps serving meanwhile.
        log.warning("%s/%s: the rollout waits: %s", cr["metadata"].get("namespace"), cr["metadata"]["name"], exc)
        return None
    status = reporting.success_status(prev, outcome, generation)
    unchanged = status.model_copy(update={"replan": prev.replan}) == prev
    if unchanged or not await _write(reconciler.kube, cr, reporting.to_patch(status)):
        return None
    if outcome.retiring:
        return None if status.phase == prev.phase else Moved(status.phase, cr, "rolling out")
    retired = [key for key in prev.retiring if key in outcome.pruned]
    return Moved(status.phase, cr, f"the new plan's workloads are ready; deleted {len(retired)} children of the "
                                   f"previous plan ({', '.join(retired)})")


async def _write(kube: KubeClient, cr: Mapping[str, Any], patch: dict[str, Any]) -> bool:
    """Write the status unless the resource moved on since it was read (a newer write wins)."""
    meta = cr["metadata"]
    try:
        await kube.patch_status(DISAGG_KIND, meta.get("namespace") or "default", meta["name"], patch,
                                resource_version=meta.get("resourceVersion"))
    except KubeApiError as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True
