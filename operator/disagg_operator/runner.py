"""Run the operator: configuration, kopf settings, and the event loop entry points.

`run_operator` is a coroutine so tests (and the CLI) can start it in a thread with their own loop
and stop it with a flag; nothing here touches process-wide state (no global kopf registry, no
global kubernetes configuration, no environment variables). Beside kopf it runs the drift
re-planning loop (telemetry/loop.py), one task for the whole operator; both share the clients,
which are closed only after both have stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kopf

from .handlers import OperatorContext, build_registry
from .kube import KubeClient, load_api_client
from .metrics import OperatorMetrics
from .planning import PlanFn, PlanningService, ProfileStore
from .reconcile import Reconciler
from .render import RenderSettings
from .telemetry.events import KubeEventPoster
from .telemetry.loop import ReplanLoop

ANNOTATION_PREFIX = "disagg.io"


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings (the `disagg operator` flags)."""

    namespaces: tuple[str, ...] = ()  # empty: every namespace
    kubeconfig: str | None = None
    context: str | None = None
    plan_workers: int = 1
    plan_threads: int = 2
    profiles_dir: Path | None = None
    liveness_endpoint: str | None = None
    metrics_port: int | None = None  # GET /metrics on 0.0.0.0:PORT (metrics.py); None: not served
    prometheus_url: str | None = None  # for resources whose spec.replan names none
    replan_tick: float = 10.0  # seconds between re-planning passes (each resource has its own interval)
    render: RenderSettings = field(default_factory=RenderSettings)


def operator_settings(namespaces: tuple[str, ...] = ()) -> kopf.OperatorSettings:
    """kopf settings: standalone (one replica, no peering CRD), state in disagg.io annotations."""
    settings = kopf.OperatorSettings()
    # Exact namespaces need no namespace watch (nor the RBAC to list namespaces cluster-wide).
    settings.scanning.disabled = bool(namespaces)
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.reporting_component = "disagg-operator"
    settings.posting.event_name_prefix = "disagg-"
    # Watches are re-opened periodically so a silently dropped connection cannot stall the operator.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.queueing.error_delays = (1, 2, 5, 10, 20, 30, 60)
    return settings


def build_context(config: OperatorConfig, *, plan_fn: PlanFn | None = None) -> OperatorContext:
    """Clients and services for one operator run. `plan_fn` defaults to the planner's find_plan."""
    kube = KubeClient(load_api_client(config.kubeconfig, config.context))
    planning = PlanningService(plan_fn, workers=config.plan_workers, threads=config.plan_threads)
    reconciler = Reconciler(kube, planning, ProfileStore(config.profiles_dir), config.render)
    return OperatorContext(kube=kube, planning=planning, reconciler=reconciler, namespaces=config.namespaces)


async def run_operator(config: OperatorConfig, *, stop_flag: asyncio.Event | threading.Event | None = None,
                       ready_flag: asyncio.Event | threading.Event | None = None,
                       plan_fn: PlanFn | None = None,
                       on_context: Callable[[OperatorContext], None] | None = None) -> None:
    """Run until `stop_flag` is set (or forever). `on_context` lets callers observe the live context."""
    ctx = build_context(config, plan_fn=plan_fn)
    if on_context is not None:
        on_context(ctx)
    poster = KubeEventPoster(ctx.kube.configuration)
    replan = ReplanLoop(ctx.kube, ctx.reconciler, namespaces=config.namespaces,
                        default_prometheus_url=config.prometheus_url, tick_s=config.replan_tick, post_event=poster)
    replan_stop = asyncio.Event()
    replan_task = asyncio.create_task(replan.run(replan_stop), name="disagg-replan")

    async def stop_replan(**_: object) -> None:
        # In kopf's cleanup, before kopf waits on (and then cancels) tasks it did not start.
        replan_stop.set()
        if not replan_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(replan_task), timeout=10)
            except asyncio.TimeoutError:
                replan_task.cancel()

    registry = build_registry(ctx)
    kopf.on.cleanup(registry=registry, id="stop-replan")(stop_replan)
    metrics = OperatorMetrics()
    metrics.register(registry)
    metrics_site = await metrics.serve("0.0.0.0", config.metrics_port) if config.metrics_port is not None else None
    try:
        await kopf.operator(
            registry=registry,
            settings=operator_settings(config.namespaces),
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            standalone=True,
            liveness_endpoint=config.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await stop_replan()  # no-op when kopf's cleanup already did it
        if metrics_site is not None:
            await metrics_site.cleanup()
        poster.close()
        ctx.planning.close()
        ctx.kube.close()
