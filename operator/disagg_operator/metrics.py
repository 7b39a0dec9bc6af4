"""The operator's own Prometheus metrics: the plan in force for each DisaggServing, and its re-plans.

Read from the DisaggServing objects kopf watches (their status is what the operator decided), so the
numbers survive an operator restart: the plan's gauges come back with the first watch event and the
last re-plan's time is `status.replan.replannedTime`. `disagg_operator_replans_total` counts the re-plans
this process saw happen (a counter reset on restart, as Prometheus expects of counters).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .crd import GROUP, PLURAL, VERSION

_KEY = ("namespace", "disaggserving")


@dataclass
class OperatorMetrics:
    """Gauges and counters of every DisaggServing this operator handles, in one registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _info_labels: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict, init=False)
    _replanned: dict[tuple[str, str], str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.plan_info = Gauge("disagg_operator_plan_info", "The plan in force (value 1), by its hash and shape.",
                               [*_KEY, "plan_hash", "mode", "prefill", "decode", "phase"], registry=r)
        self.plan_gpus = Gauge("disagg_operator_plan_gpus", "GPUs the plan in force uses.", _KEY, registry=r)
        self.plan_goodput = Gauge("disagg_operator_plan_goodput_rps", "Predicted goodput of the plan in force, "
                                  "requests/s.", _KEY, registry=r)
        self.target_attainment = Gauge("disagg_operator_slo_attainment_target", "spec.slo.attainment: the share "
                                       "of requests that must meet both SLOs.", _KEY, registry=r)
        self.last_replan = Gauge("disagg_operator_last_replan_timestamp_seconds", "Unix time of the last drift "
                                 "re-plan (status.replan.replannedTime).", _KEY, registry=r)
        self.replans = Counter("disagg_operator_replans", "Drift re-plans seen by this operator process.", _KEY,
                               registry=r)

    def observe(self, body: Mapping[str, Any]) -> None:
        """Update the series of one DisaggServing from its current object."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        plan = status.get("plan") or {}
        if status.get("planHash") and plan:
            labels = (*key, str(status["planHash"]), str(plan.get("mode", "disaggregated")),
                      str(status.get("prefillShape") or ""), str(status.get("decodeShape") or ""),
                      str(status.get("phase") or ""))
            previous = self._info_labels.get(key)
            if previous is not None and previous != labels:
                self.plan_info.remove(*previous)
            self.plan_info.labels(*labels).set(1)
            self._info_labels[key] = labels
            if status.get("gpus") is not None:
                self.plan_gpus.labels(*key).set(status["gpus"])
            if status.get("goodputRps") is not None:
                self.plan_goodput.labels(*key).set(status["goodputRps"])
        attainment = ((body.get("spec") or {}).get("slo") or {}).get("attainment")
        if attainment is not None:
            self.target_attainment.labels(*key).set(attainment)
        replanned = ((status.get("replan") or {}).get("replannedTime"))
        if replanned:
            self.last_replan.labels(*key).set(_unix(replanned))
            seen = self._replanned.get(key)
            if seen is not None and seen != replanned:
                self.replans.labels(*key).inc()
            self._replanned[key] = replanned
        self.replans.labels(*key)  # exported as 0 from the start, so increase() sees the first re-plan

    def forget(self, namespace: str, name: str) -> None:
        """Drop the series of a deleted DisaggServing."""
        key = (namespace, name)
        labels = self._info_labels.pop(key, None)
        if labels is not None:
            self.plan_info.remove(*labels)
        self._replanned.pop(key, None)
        for metric in (self.plan_gpus, self.plan_goodput, self.target_attainment, self.last_replan, self.replans):
            try:
                metric.remove(*key)
            except KeyError:
                pass

    def register(self, registry: kopf.OperatorRegistry) -> None:
        """Watch DisaggServings (every event, status changes included) to keep the series current."""

        @kopf.on.event(GROUP, VERSION, PLURAL, id="metrics", registry=registry)
        async def on_event(type: str | None, body: kopf.Body, **_: Any) -> None:
            meta = body.get("metadata") or {}
            if type == "DELETED":
                self.forget(str(meta.get("namespace", "")), str(meta.get("name", "")))
            else:
                self.observe(body)

    async def handle(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Serve GET /metrics on host:port until the returned runner is cleaned up."""
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner


def _unix(rfc3339: str) -> float:
    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
