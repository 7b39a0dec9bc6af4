"""kopf wiring: handlers registered on a registry of their own (no module-level global registry).

- create / update / resume -> `Reconciler.reconcile` -> status (+ Events when the plan changes);
- invalid specs, infeasible SLOs and unrenderable plans are permanent errors (kopf stops retrying
  until the spec changes); API failures are temporary, retried with growing delays;
- a readiness timer moves Progressing -> Ready as workloads report ready replicas;
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

from . import reporting
from .crd import GROUP, PLURAL, VERSION
from .errors import InvalidSpecError, KubeApiError, RenderError
from .kube import KubeClient
from .planning import PlanningService
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
    readiness_interval: float


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

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        ctx.planning.close()
        ctx.kube.close()

    async def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, retry: int, **_: Any) -> None:
        await _reconcile(ctx, body, patch, logger, retry)

    for cause, decorator in (("create", kopf.on.create), ("update", kopf.on.update), ("resume", kopf.on.resume)):
        decorator(*RESOURCE, id=f"reconcile-{cause}", registry=registry)(reconcile)

    @kopf.on.event(*RESOURCE, registry=registry)
    async def on_deleted(type: str | None, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        if type == "DELETED":
            gone = await ctx.reconciler.delete_children(body)
            logger.info("deleted %d children with their DisaggServing", len(gone))

    @kopf.timer(*RESOURCE, interval=ctx.readiness_interval, initial_delay=ctx.readiness_interval,
                registry=registry, when=_rolled_out)
    async def readiness(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        ready = await ctx.reconciler.observe_ready(body)
        prev = reporting.previous_status(body)
        if ready is None or (prev.phase == "Ready") == ready:
            return
        status = reporting.readiness_status(prev, ready, body.metadata.get("generation"))
        patch.status.update(reporting.to_patch(status))
        kopf.info(body, reason="Ready" if ready else "NotReady",
                  message="all workloads ready" if ready else "workloads lost ready replicas")

    return registry


def _rolled_out(status: Mapping[str, Any], **_: Any) -> bool:
    return (status or {}).get("phase") in ("Progressing", "Ready")


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
