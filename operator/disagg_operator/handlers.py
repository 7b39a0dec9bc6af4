"""kopf wiring: handlers registered on a registry of their own (no module-level global registry).

- create / update / resume -> `Reconciler.reconcile` -> status (+ Events when the plan changes);
- invalid specs, infeasible SLOs and unrenderable plans are permanent errors (kopf stops retrying
  until the spec changes); API failures are temporary, retried with growing delays;
- events of the operator's StatefulSets/Deployments move the owner Progressing <-> Ready (no timer:
  kopf guards timers with a finalizer, which would block deletions while the operator is down);
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
from disagg_planner.errors import NoFeasiblePlan, PlannerError

from . import labels as lb
from . import reporting
from .crd import GROUP, PLURAL, VERSION
from .errors import InvalidSpecError, KubeApiError, RenderError
from .kube import KubeClient
from .planning import PlanningService
from .readiness import refresh_readiness
from .reconcile import Reconciler
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

    async def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, retry: int, **_: Any) -> None:
        await _reconcile(ctx, body, patch, logger, retry)

    for cause, decorator in (("create", kopf.on.create), ("update", kopf.on.update), ("resume", kopf.on.resume)):
        decorator(*RESOURCE, id=f"reconcile-{cause}", registry=registry)(reconcile)

    @kopf.on.event(*RESOURCE, registry=registry, when=lambda type, **_: type == "DELETED")
    async def on_deleted(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        gone = await ctx.reconciler.delete_children(body)
        logger.info("deleted %d children with their DisaggServing", len(gone))

    async def workload_changed(namespace: str | None, labels: Mapping[str, str], logger: logging.Logger,
                               **_: Any) -> None:
        instance = labels.get(lb.INSTANCE)
        if namespace and instance:
            moved = await refresh_readiness(ctx.kube, namespace, instance)
            if moved is not None:
                phase, owner = moved
                logger.info("DisaggServing %s/%s is now %s", namespace, instance, phase)
                kopf.info(owner, reason=phase, message="all workloads ready" if phase == "Ready"
                          else "workloads are missing ready replicas")

    for plural in ("statefulsets", "deployments"):
        kopf.on.event("apps", "v1", plural, labels={lb.MANAGED: lb.MANAGED_BY}, id=f"readiness-{plural}",
                      registry=registry)(workload_changed)

    return registry


async def _reconcile(ctx: OperatorContext, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                     retry: int) -> None:
    prev = reporting.previous_status(body)
    generation = body.metadata.get("generation")
    try:
        outcome = await ctx.reconciler.reconcile(body)
    except InvalidSpecError as exc:
        _fail(body, patch, prev, generation, reporting.INVALID_SPEC, str(exc), planned=False)
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    except NoFeasiblePlan as exc:
        _fail(body, patch, prev, generation, reporting.NO_FEASIBLE_PLAN, str(exc), planned=False)
        raise kopf.PermanentError(str(exc)) from exc
    except PlannerError as exc:
        _fail(body, patch, prev, generation, reporting.PLANNING_FAILED, str(exc), planned=False)
        raise kopf.PermanentError(str(exc)) from exc
    except RenderError as exc:
        _fail(body, patch, prev, generation, reporting.RENDER_FAILED, str(exc), planned=True)
        raise kopf.PermanentError(str(exc)) from exc
    except KubeApiError as exc:
        _fail(body, patch, prev, generation, reporting.APPLY_FAILED, str(exc), planned=True)
        if exc.status in _PERMANENT_HTTP:
            raise kopf.PermanentError(str(exc)) from exc
        raise kopf.TemporaryError(str(exc), delay=min(60.0, 2.0 ** retry)) from exc

    status = reporting.success_status(prev, outcome, generation)
    patch.status.update(reporting.to_patch(status))
    if outcome.plan_changed:
        kopf.info(body, reason="Planned", message=reporting.describe_plan(outcome.plan))
    if outcome.applied or outcome.pruned:
        kopf.info(body, reason="Applied",
                  message=f"applied {len(outcome.applied)}, deleted {len(outcome.pruned)} children")
    logger.info("%s: %s; applied %d, pruned %d, plan %s", status.phase, reporting.describe_plan(outcome.plan),
                len(outcome.applied), len(outcome.pruned), "cached" if outcome.plan_cached else "searched")


def _fail(body: kopf.Body, patch: kopf.Patch, prev: DisaggServingStatus, generation: int | None, reason: str,
          message: str, *, planned: bool) -> None:
    status = reporting.failure_status(prev, reason, message, generation, planned=planned)
    patch.status.update(reporting.to_patch(status))
    kopf.warn(body, reason=reason, message=message[:1024])


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
