"""kopf wiring: handlers registered on a registry of their own (no module-level global registry).

- create / update / resume -> `Reconciler.reconcile` -> status (+ Events when the plan changes);
- invalid specs, infeasible SLOs and unrenderable plans are permanent errors (kopf stops retrying
  until the spec changes); API failures are temporary, retried with growing delays;
- a `spec.profile` that cannot be read or used is Degraded too, but retried with growing delays: it
  heals when the ConfigMap is created or fixed, without a spec change;
- events of the operator's StatefulSets/Deployments move the owner Progressing <-> Ready and carry a
  rollout forward (readiness.py; no timer: kopf guards timers with a finalizer, which would block
  deletions while the operator is down);
- the handlers write the status themselves, under the resource's lock (locks.py), rather than through
  kopf's patch, which kopf applies after the handler returned and the lock is gone;
- deletion: children carry owner references (garbage collection on real clusters) and are also
  deleted explicitly on the DELETED watch event, without a finalizer, so a resource never hangs
  in Terminating when the operator is down; an orphan sweep at start-up catches those deletions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from disagg_planner.errors import NoFeasiblePlan, PlannerError, PlanningTimeout

from . import labels as lb
from . import reporting
from .crd import GROUP, PLURAL, VERSION
from .errors import InvalidSpecError, KubeApiError, ProfileError, RenderError
from .kube import KubeClient
from .planning import PlanningService
from .readiness import refresh_readiness
from .reconcile import DISAGG_KIND, Reconciler
from .status import DisaggServingStatus

RESOURCE = (GROUP, VERSION, PLURAL)
_PERMANENT_HTTP = (400, 404, 422)  # the request itself is wrong: retrying cannot help


@dataclass
class OperatorContext:
    """What the handlers share: built once per operator run and closed at its end."""

    kube: KubeClient
    planning: PlanningService
    reconciler: Reconciler
    namespaces: tuple[str, ...]


def build_registry(ctx: OperatorContext) -> kopf.OperatorRegistry:
    """A kopf registry with every handler of the operator bound to `ctx`."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(ctx.kube)

    @kopf.on.startup(registry=registry)
    async def sweep(logger: logging.Logger, **_: Any) -> None:
        orphans = await ctx.reconciler.sweep_orphans(ctx.namespaces)
        if orphans:
            logger.info("deleted %d orphaned children: %s", len(orphans), ", ".join(orphans))

    async def reconcile(body: kopf.Body, logger: logging.Logger, retry: int, **_: Any) -> None:
        await _reconcile(ctx, body, logger, retry)

    for cause, decorator in (("create", kopf.on.create), ("update", kopf.on.update), ("resume", kopf.on.resume)):
        decorator(*RESOURCE, id=f"reconcile-{cause}", registry=registry)(reconcile)

    @kopf.on.event(*RESOURCE, registry=registry, when=lambda type, **_: type == "DELETED")
    async def on_deleted(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        gone = await ctx.reconciler.delete_children(body)
        logger.info("deleted %d children with their DisaggServing", len(gone))

    async def workload_changed(namespace: str | None, labels: Mapping[str, str], meta: Mapping[str, Any],
                               logger: logging.Logger, **_: Any) -> None:
        # The owner reference names the resource; the instance label is a hashed form for names over 63.
        owners = [r.get("name") for r in meta.get("ownerReferences") or [] if r.get("kind") == DISAGG_KIND.kind]
        instance = owners[0] if owners else labels.get(lb.INSTANCE)
        if namespace and instance:
            moved = await refresh_readiness(ctx.reconciler, namespace, instance)
            if moved is not None:
                logger.info("DisaggServing %s/%s is %s: %s", namespace, instance, moved.phase, moved.message)
                kopf.info(moved.resource, reason=moved.phase, message=moved.message)

    for plural in ("statefulsets", "deployments"):
        kopf.on.event("apps", "v1", plural, labels={lb.MANAGED: lb.MANAGED_BY}, id=f"readiness-{plural}",
                      registry=registry)(workload_changed)

    return registry


async def _reconcile(ctx: OperatorContext, body: kopf.Body, logger: logging.Logger, retry: int) -> None:
    namespace, name = body.metadata.namespace or "default", body.metadata.name
    async with ctx.reconciler.exclusive(namespace, name):
        # Read again under the lock: a workload event or the re-planning loop may have written since kopf
        # read it (status.replan's observed workload, for one, decides what to plan for).
        cr = await ctx.kube.get(DISAGG_KIND, namespace, name)
        if cr is None:
            return  # deleted meanwhile
        await _reconcile_locked(ctx, cr, logger, retry)


async def _reconcile_locked(ctx: OperatorContext, cr: dict[str, Any], logger: logging.Logger, retry: int) -> None:
    prev = reporting.previous_status(cr)
    generation = cr["metadata"].get("generation")
    async def searching() -> None:
        message = f"searching placements (deadline {ctx.planning.deadline_s:g}s)"
        try:
            await _write_status(ctx, cr, reporting.to_patch(reporting.planning_status(prev, message, generation)))
        except KubeApiError as exc:  # the search goes on; its outcome is written after
            logger.warning("could not write the Planning status: %s", exc)

    try:
        outcome = await ctx.reconciler.reconcile(cr, before_search=searching)
    except InvalidSpecError as exc:
        await _fail(ctx, cr, prev, generation, reporting.INVALID_SPEC, str(exc), planned=False)
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    except ProfileError as exc:
        await _fail(ctx, cr, prev, generation, exc.reason, str(exc), planned=False)
        raise kopf.TemporaryError(str(exc), delay=_backoff(retry)) from exc
    except PlanningTimeout as exc:
        # Permanent until the spec changes: the same search would be stopped again, holding a thread meanwhile.
        await _fail(ctx, cr, prev, generation, reporting.PLANNING_TIMEOUT, str(exc), planned=False)
        raise kopf.PermanentError(str(exc)) from exc
    except NoFeasiblePlan as exc:
        await _fail(ctx, cr, prev, generation, reporting.NO_FEASIBLE_PLAN, str(exc), planned=False)
        raise kopf.PermanentError(str(exc)) from exc
    except PlannerError as exc:
        await _fail(ctx, cr, prev, generation, reporting.PLANNING_FAILED, str(exc), planned=False)
        raise kopf.PermanentError(str(exc)) from exc
    except RenderError as exc:
        await _fail(ctx, cr, prev, generation, reporting.RENDER_FAILED, str(exc), planned=True)
        raise kopf.PermanentError(str(exc)) from exc
    except KubeApiError as exc:
        await _fail(ctx, cr, prev, generation, reporting.APPLY_FAILED, str(exc), planned=True)
        if exc.status in _PERMANENT_HTTP:
            raise kopf.PermanentError(str(exc)) from exc
        raise kopf.TemporaryError(str(exc), delay=_backoff(retry)) from exc

    status = reporting.success_status(prev, outcome, generation)
    await _write_status(ctx, cr, reporting.to_patch(status))
    if outcome.plan_changed:
        kopf.info(cr, reason="Planned", message=reporting.describe_plan(outcome.plan))
    if outcome.applied or outcome.pruned:
        serving = f"; {len(outcome.retiring)} children of the previous plan serve until the new workloads are " \
                  "ready" if outcome.retiring else ""
        kopf.info(cr, reason="Applied",
                  message=f"applied {len(outcome.applied)}, deleted {len(outcome.pruned)} children{serving}")
    logger.info("%s: %s; applied %d, pruned %d, retiring %d, plan %s", status.phase,
                reporting.describe_plan(outcome.plan), len(outcome.applied), len(outcome.pruned),
                len(outcome.retiring), "cached" if outcome.plan_cached else "searched")


def _backoff(retry: int) -> float:
    return min(60.0, 2.0 ** retry)


async def _fail(ctx: OperatorContext, cr: dict[str, Any], prev: DisaggServingStatus, generation: int | None,
                reason: str, message: str, *, planned: bool) -> None:
    status = reporting.failure_status(prev, reason, message, generation, planned=planned)
    try:
        await _write_status(ctx, cr, reporting.to_patch(status))
    except KubeApiError as exc:  # the reason is still logged and posted as an Event
        logging.getLogger(__name__).warning("could not write the Degraded status: %s", exc)
    kopf.warn(cr, reason=reason, message=message[:1024])


async def _write_status(ctx: OperatorContext, cr: dict[str, Any], patch: dict[str, Any]) -> None:
    """Merge-patch the status (no resourceVersion guard: the writers of this process are serialised by
    the lock, and kopf's own annotation writes must not turn into conflicts)."""
    meta = cr["metadata"]
    try:
        await ctx.kube.patch_status(DISAGG_KIND, meta.get("namespace") or "default", meta["name"], patch)
    except KubeApiError as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to report on
            raise


def connection_info(kube: KubeClient) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration the operator's own client uses."""
    cfg = kube.configuration
    # get_api_key_with_prefix runs the client's refresh hook (rotated in-cluster tokens, exec plugins).
    token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
    if token and token.lower().startswith("bearer "):
        token = token[7:]
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        default_namespace=None,
    )
