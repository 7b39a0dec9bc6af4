"""A small async façade over the official `kubernetes` client for the few verbs the operator needs.

The official client is synchronous; every call runs in a thread so the kopf event loop never waits
on the network. Requests go through the client's generic `param_serialize`/`call_api`, so any kind
works without API discovery and server-side apply is a plain PATCH with
`application/apply-patch+yaml`.

Two defensive choices keep the operator correct on API servers that implement less than a real
one (the kmock emulator used in CI, for one):
- list results are re-filtered by their labels on the client (a server ignoring `labelSelector`
  would otherwise make pruning delete foreign objects);
- an apply answered 404 (a server that does not create on apply) is retried as a create.
A real API server never takes either path differently from the plain one.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kubernetes.client
import kubernetes.config
import urllib3

from . import labels as lb
from .errors import KubeApiError


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if subresource:
            base += f"/{subresource}"
        return base


KINDS: dict[str, Kind] = {k.kind: k for k in (
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Service", "services"),
    Kind("apps/v1", "StatefulSet", "statefulsets"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("v1", "Secret", "secrets"),
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
)}
CHILD_KINDS: tuple[Kind, ...] = tuple(KINDS.values())


def kind_of(obj: Mapping[str, Any]) -> Kind:
    try:
        return KINDS[obj["kind"]]
    except KeyError as exc:
        raise KeyError(f"kind {obj.get('kind')!r} is not one the operator manages") from exc


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> kubernetes.client.ApiClient:
    """An ApiClient from a kubeconfig file (or $KUBECONFIG / ~/.kube/config), else the in-cluster account.

    Nothing global is touched: the configuration lives in the returned client only.
    """
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None and _in_cluster():
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    else:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg,
                                           persist_config=False)
    return kubernetes.client.ApiClient(configuration=cfg)


def _in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ and "KUBECONFIG" not in os.environ


class KubeClient:
    """Async get/list/apply/delete of arbitrary kinds; thread-offloaded, no global state."""

    def __init__(self, api: kubernetes.client.ApiClient, *, threads: int = 4) -> None:
        self._api = api
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="disagg-kube")

    @property
    def configuration(self) -> kubernetes.client.Configuration:
        return self._api.configuration

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    async def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", kind.path(namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: Kind, namespace: str | None, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        data = await self._call("GET", kind.path(namespace), query=[("labelSelector", lb.selector_string(selector))])
        items = data.get("items") or []
        return [i for i in items if lb.matches(i.get("metadata", {}).get("labels"), selector)]

    async def apply(self, obj: dict[str, Any], *, field_manager: str = lb.FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply with `force` (this operator is the only writer of its children)."""
        kind = kind_of(obj)
        meta = obj["metadata"]
        query = [("fieldManager", field_manager), ("force", "true")]
        try:
            return await self._call("PATCH", kind.path(meta.get("namespace"), meta["name"]), query=query, body=obj,
                                    content_type="application/apply-patch+yaml")
        except KubeApiError as exc:
            if exc.status != 404:
                raise
        try:
            return await self._call("POST", kind.path(meta.get("namespace")),
                                    query=[("fieldManager", field_manager)], body=obj)
        except KubeApiError as exc:
            if exc.status != 409:
                raise
        # Created meanwhile by someone else (e.g. a previous operator process still finishing): apply over it.
        return await self._call("PATCH", kind.path(meta.get("namespace"), meta["name"]), query=query, body=obj,
                                content_type="application/apply-patch+yaml")

    async def patch_status(self, kind: Kind, namespace: str | None, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the status subresource; with `resource_version`, fail (409) if the object moved on."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._call("PATCH", kind.path(namespace, name, "status"), body=body,
                                content_type="application/merge-patch+json")

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        """Delete in the background (dependents too); False when it was already gone."""
        try:
            await self._call("DELETE", kind.path(namespace, name),
                             body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"})
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def _call(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                    body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call_sync, method, path, query, body, content_type)

    def _call_sync(self, method: str, path: str, query: list[tuple[str, str]] | None, body: Any,
                   content_type: str) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self._api.param_serialize(method, path, query_params=query or [], header_params=headers,
                                               body=body, auth_settings=["BearerToken"])
        try:
            response = self._api.call_api(*serialized, _request_timeout=30)
            response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeApiError(0, "Unreachable", str(exc), verb=method, path=path) from exc
        text = response.data.decode("utf-8") if response.data else ""
        if not 200 <= response.status < 300:
            raise KubeApiError(response.status, *_status_reason(text, response.reason), verb=method, path=path)
        return json.loads(text) if text else {}


def _status_reason(text: str, http_reason: str | None) -> tuple[str, str]:
    try:
        status = json.loads(text)
        return str(status.get("reason") or http_reason or "Error"), str(status.get("message") or "")
    except (ValueError, AttributeError):
        return http_reason or "Error", text[:500]
