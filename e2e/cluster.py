"""The API server the e2e tests talk to: kmock's Kubernetes emulator in a thread, or a real cluster.

kmock's `KubernetesEmulator` stores objects and serves list/watch/get/create/patch/delete over
HTTP, but leaves the bookkeeping a real API server does to the user ("inherit and implement for
your cases", its docs say). `ApiServerEmulator` adds exactly that bookkeeping, nothing more:
`metadata.uid`, `namespace`, `creationTimestamp`, a `resourceVersion` that grows with every write,
a `generation` that grows when `spec` changes (what `observedGeneration` is compared with), names
for `generateName` (kopf's Events use it), and 201 Created for creates.
Not emulated, and handled by the operator in a way real clusters also accept: owner-reference
garbage collection (the operator deletes children itself), label selectors (the operator
re-filters lists), create-on-apply (the operator creates when an apply finds nothing).

Clients are untouched: the official `kubernetes` client and kopf reach the emulator over HTTP
through a generated kubeconfig, exactly as they reach a real cluster.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kmock
import yaml

DISAGG_RESOURCE = "disagg.io/v1alpha1/disaggservings"


class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata an API server maintains (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.__versions = itertools.count(1)
        # Seconds each write to a resource (by plural) takes: lets tests stop an operator mid-reconcile.
        self.write_latency: dict[str, float] = {}
        self.__in_flight: set[int] = set()

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock logs every request for assertions and routes each new one by scanning that log, which
        # makes a long session quadratic (seconds per request after a few thousand). Nothing here asserts
        # on the log, so it keeps only the requests still being served (watch streams, mostly).
        self.__in_flight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self.__in_flight]
        try:
            return await self.__handle(request)
        finally:
            self.__in_flight.discard(id(request))

    async def __handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.method in (kmock.method.POST, kmock.method.PATCH, kmock.method.PUT):
            delay = self.write_latency.get(request.resource.plural or "", 0.0)
            if delay:
                await asyncio.sleep(delay)
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("namespace", request.namespace)
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self.__versions))
            elif request.action == kmock.action.UPDATE and request.name is not None:
                meta["resourceVersion"] = str(next(self.__versions))
                if "spec" in data and request.subresource is None:
                    current = self._current(request)
                    if current is not None and _merged(current.get("spec"), data["spec"]) != current.get("spec"):
                        meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        response = await super()._handle(request)
        if request.action == kmock.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)  # as a real API server answers a create (typed clients rely on it)
        return response

    def _current(self, request: kmock.Request) -> Mapping[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return dict(self.objects[key].raw)
        return None


def _merged(old: Any, patch: Any) -> Any:
    """JSON merge-patch (RFC 7386), to tell whether a patch really changes the spec."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(old) if isinstance(old, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class EmulatedCluster:
    """The emulator serving HTTP on 127.0.0.1 from a background thread with its own event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmock", daemon=True)
        self.emulator: ApiServerEmulator | None = None
        self._server: kmock.Server | None = None
        self.url = ""

    def start(self) -> EmulatedCluster:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        emulator = ApiServerEmulator()
        emulator.resources.load_bundled()
        emulator.resources[DISAGG_RESOURCE] = kmock.ResourceInfo(
            kind="DisaggServing", singular="disaggserving", namespaced=True, shortnames={"dsv"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"}, subresources={"status"},
        )
        await emulator.__aenter__()
        server = kmock.Server(emulator)
        await server.__aenter__()
        self.emulator, self._server = emulator, server
        self.url = str(server.url).rstrip("/")

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                await self._server.__aexit__(None, None, None)
            if self.emulator is not None:
                await self.emulator.__aexit__(None, None, None)

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at the emulator (plain HTTP, a dummy token)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "e2e"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path
