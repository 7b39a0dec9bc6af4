"""Run the operator: configuration, kopf settings, and the event loop entry points.

`run_operator` is a coroutine so tests (and the CLI) can start it in a thread with their own loop
and stop it with a flag; nothing here touches process-wide state (no global kopf registry, no
global kubernetes configuration, no environment variables).
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
from .planning import PlanFn, PlanningService, ProfileStore
from .reconcile import Reconciler
from .render import RenderSettings

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
    await kopf.operator(
        registry=build_registry(ctx),
        settings=operator_settings(config.namespaces),
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        standalone=True,
        liveness_endpoint=config.liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
