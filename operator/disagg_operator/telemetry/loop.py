"""The operator's re-planning loop: every DisaggServing with `spec.replan.enabled`, every interval.

One asyncio task for the whole operator rather than a kopf timer per resource: kopf guards timers
with a finalizer, which would hold deletions while the operator is down (see `handlers.py`). Each
pass lists the resources, and for every one whose interval has passed runs `replan_tick`. On
confirmed drift it reconciles with the observed workload in place of `spec.workload` (the spec is not
rewritten), then writes the reconcile's status and `status.replan` in one merge patch guarded by the
resourceVersion it read: a concurrent reconcile or edit wins, and the next pass looks again. The
reconcile and the write hold the resource's lock (locks.py), like the kopf handlers do. A new plan
rolls out like any other: beside the serving one until it is ready (rollout.py).

A re-plan that cannot be carried out (no feasible plan for the observed rate, a failed apply) leaves
the running plan and its children alone and records why; the observed workload is not adopted, so
later reconciles keep planning for the workload that works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time as wallclock
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from disagg_planner.errors import PlannerError

from .. import reporting
from ..errors import InvalidSpecError, KubeApiError, OperatorError
from ..kube import KubeClient
from ..reconcile import DISAGG_KIND, Outcome, Reconciler, parse_spec
from .drift import DriftDetector
from .errors import TelemetryConfigError, TelemetryError
from .names import MetricNames, ScrapeLabels
from .observation import WorkloadObservation
from .replan import (
    ReplanDecision,
    ReplanEvent,
    WorkloadSource,
    effective_spec,
    record_plan,
    replan_due,
    replan_tick,
    telemetry_for,
)

EventPoster = Callable[[Mapping[str, Any], ReplanEvent], Awaitable[None]]
_ROLLED_OUT = ("Progressing", "Ready")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckOutcome:
    """What one resource's check did: the decision, and the rollout it caused (if any)."""

    namespace: str
    name: str
    decision: ReplanDecision
    rollout: Outcome | None = None
    error: str | None = None  # a re-plan that could not be carried out
    written: bool = False  # False: nothing to write, or the resource moved on meanwhile


@dataclass
class _Unconfigured:
    """A workload source for a resource whose telemetry cannot be set up: every read fails with why."""

    error: TelemetryError

    async def observe(self, at: float | None = None) -> WorkloadObservation:
        raise self.error


@dataclass
class ReplanLoop:
    """Runs `replan_tick` for every DisaggServing in `namespaces` (empty: all) every `tick_s` seconds."""

    kube: KubeClient
    reconciler: Reconciler
    namespaces: tuple[str, ...] = ()
    default_prometheus_url: str | None = None
    tick_s: float = 10.0
    min_requests: float | None = None  # None: each resource's spec.replan.minRequests
    names: MetricNames = field(default_factory=MetricNames)
    labels: ScrapeLabels = field(default_factory=ScrapeLabels)
    post_event: EventPoster | None = None  # a KubeEventPoster in the operator; without one, events are logged

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Check all resources every `tick_s` until `stop` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.check_all()
            except KubeApiError as exc:  # the API server is away: the next pass retries
                log.warning("re-planning pass failed: %s", exc)
            except Exception:  # a background task that dies stops re-planning silently: log and go on
                log.exception("re-planning pass failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.tick_s)
            except asyncio.TimeoutError:
                pass

    async def check_all(self, now: float | None = None) -> list[CheckOutcome]:
        scopes: tuple[str | None, ...] = self.namespaces or (None,)
        outcomes: list[CheckOutcome] = []
        for ns in scopes:
            for cr in await self.kube.list(DISAGG_KIND, ns, {}):
                outcome = await self.check(cr, now)
                if outcome is not None:
                    outcomes.append(outcome)
        return outcomes

    async def check(self, cr: Mapping[str, Any], now: float | None = None) -> CheckOutcome | None:
        """One resource: None when there is nothing to check (not rolled out, not due, invalid spec)."""
        now = wallclock.time() if now is None else now
        meta = cr.get("metadata", {})
        name, namespace = meta["name"], meta.get("namespace") or "default"
        status = cr.get("status") or {}
        try:
            spec = parse_spec(cr.get("spec"))
        except InvalidSpecError:
            return None  # the reconcile reports it
        rolled_out = status.get("phase") in _ROLLED_OUT and status.get("observedGeneration") == meta.get("generation")
        if not rolled_out:
            return None  # nothing runs yet, or a reconcile of a newer spec is due and will decide
        if not spec.replan.enabled and not status.get("replan"):
            return None  # never enabled: nothing to clear
        if spec.replan.enabled and not replan_due(spec, status, now):
            return None
        source: WorkloadSource
        try:
            source = telemetry_for(spec, name, namespace, self.default_prometheus_url, names=self.names,
                                        labels=self.labels)
        except TelemetryConfigError as exc:
            source = _Unconfigured(exc)
        detector = DriftDetector.from_spec(spec.replan, self.min_requests)
        decision = await replan_tick(spec, status, source, detector, now=now)
        if not decision.changed:
            return CheckOutcome(namespace, name, decision)

        patch = decision.status_patch()
        rollout, error = None, None
        async with self.reconciler.exclusive(namespace, name):
            current = await self.kube.get(DISAGG_KIND, namespace, name)
            if current is None or current["metadata"].get("resourceVersion") != meta.get("resourceVersion"):
                # Written since it was read (a reconcile, an edit): rolling out now could undo that write.
                return CheckOutcome(namespace, name, decision)
            if decision.replan:
                rollout, error, patch = await self._roll_out(cr, status, decision)
            written = await self._write(namespace, name, meta.get("resourceVersion"), patch)
        if written:
            await self._announce(cr, decision, rollout, error)
        return CheckOutcome(namespace, name, decision, rollout, error, written)

    async def _roll_out(self, cr: Mapping[str, Any], status: Mapping[str, Any],
                        decision: ReplanDecision) -> tuple[Outcome | None, str | None, dict[str, Any]]:
        """Reconcile for the observed workload; the status patch to write either way."""
        replanned = {**status, **_json(decision.status_patch())}
        spec = effective_spec(parse_spec(cr.get("spec")), replanned)
        body = {**cr, "spec": spec.model_dump(mode="json", by_alias=True), "status": replanned}
        try:
            outcome = await self.reconciler.reconcile(body)
        except (PlannerError, OperatorError) as exc:  # no plan, a profile, a render or an apply failed
            failed = decision.previous.model_copy(update={
                "last_check_time": decision.status.last_check_time, "last_result": "Drifting",
                "message": f"re-plan for the observed workload failed, the running plan stays: {exc}"[:4096],
                "last_observation": decision.status.last_observation})
            return None, str(exc), {"replan": failed.model_dump(mode="json", by_alias=True)}
        prev = reporting.previous_status(cr)
        generation = cr.get("metadata", {}).get("generation")
        patch = reporting.to_patch(reporting.success_status(prev, outcome, generation))
        patch["replan"] = record_plan(decision.status, outcome.plan_hash).model_dump(mode="json", by_alias=True)
        return outcome, None, patch

    async def _write(self, namespace: str, name: str, version: str | None, patch: dict[str, Any]) -> bool:
        try:
            await self.kube.patch_status(DISAGG_KIND, namespace, name, patch, resource_version=version)
        except KubeApiError as exc:
            if exc.status in (404, 409):  # deleted, or changed since it was read: the next pass decides
                return False
            raise
        return True

    async def _announce(self, cr: Mapping[str, Any], decision: ReplanDecision, rollout: Outcome | None,
                  error: str | None) -> None:
        events = [decision.event] if decision.event is not None else []
        if error is not None:
            events = [ReplanEvent("Warning", "ReplanFailed", f"workload drifted but re-planning failed: {error}"
                                  [:1024])]
        elif rollout is not None and rollout.plan_changed:
            events.append(ReplanEvent("Normal", "Planned", reporting.describe_plan(rollout.plan)))
        for event in events:
            log.info("%s/%s: %s: %s", cr["metadata"].get("namespace"), cr["metadata"]["name"], event.reason,
                     event.message)
            if self.post_event is not None:
                await self.post_event(cr, event)


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))
