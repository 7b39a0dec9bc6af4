"""Kubernetes Events about a DisaggServing, posted from outside kopf's handlers.

kopf's `kopf.event` only works inside a per-object handler (its event queue lives in that task's
context); the re-planning loop is an operator-wide task, so it posts core/v1 Events itself, shaped like
kopf's (same reporting component, `disagg-` name prefix) so `kubectl describe` shows them together.
Posting is best effort: a failed Event is logged, never allowed to fail the check that caused it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import kubernetes.client
import urllib3

from .replan import ReplanEvent

log = logging.getLogger(__name__)
COMPONENT = "disagg-operator"


class KubeEventPoster:
    """Posts `ReplanEvent`s as core/v1 Events on the resource they are about."""

    def __init__(self, configuration: kubernetes.client.Configuration, *, component: str = COMPONENT) -> None:
        self._api = kubernetes.client.ApiClient(configuration=configuration)
        self._core = kubernetes.client.CoreV1Api(self._api)
        self._component = component

    def close(self) -> None:
        self._api.close()

    async def __call__(self, body: Mapping[str, Any], event: ReplanEvent) -> None:
        await asyncio.to_thread(self._post, body, event)

    def manifest(self, body: Mapping[str, Any], event: ReplanEvent, now: dt.datetime | None = None) -> dict[str, Any]:
        meta = body.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        stamp = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": "disagg-", "namespace": namespace},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta.get("name"),
                               "namespace": namespace, "uid": meta.get("uid")},
            "type": event.type, "reason": event.reason, "message": event.message[:1024],
            "source": {"component": self._component}, "reportingComponent": self._component,
            "reportingInstance": self._component, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }

    def _post(self, body: Mapping[str, Any], event: ReplanEvent) -> None:
        manifest = self.manifest(body, event)
        try:
            # No deserialisation into V1Event: the answer is not needed, and an API server that echoes
            # a field the client model does not know must not turn a posted Event into an error.
            self._core.create_namespaced_event(manifest["metadata"]["namespace"], manifest, _preload_content=False,
                                               _request_timeout=10)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("could not post Event %s on %s: %s", event.reason, manifest["involvedObject"]["name"], exc)
