"""A node agent for e2e: the workload controllers and kubelet the API emulator does not run.

It watches (polls) one namespace of the API server for StatefulSets and Deployments, creates their Pods
in the API as their controllers would, and runs each pod as local processes (pod_process.py) in its own
network namespace (podnet.py). It reports back what a kubelet and the controllers report: pod phase,
IP and Ready from the probes the manifest declares, and each workload's replicas / readyReplicas /
updatedReplicas / observedGeneration. A Pod deleted in the API (or one its workload no longer wants)
gets SIGTERM, its grace period, then SIGKILL.

Rollouts follow the controllers' default strategies: a Deployment surges (new pods first, old ones go
once the new are ready); a StatefulSet replaces pods from the highest ordinal down, one at a time,
each after the previous one is ready.

Alongside, the agent keeps the names that cluster DNS would serve (`<pod>.<service>.<ns>.svc` for
StatefulSet pods, with `.cluster.local`), a file_sd target file that a Prometheus `kubernetes-pods`-style
job scrapes (pod_scrape.py), and port-forwards to Services for the test's own clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from . import pod_scrape
from .pod_process import Cluster, PodProcess, PodSpecError
from .podnet import PodNetwork

log = logging.getLogger(__name__)

TEMPLATE_HASH = "controller-revision-hash"
WORKLOADS = ("StatefulSet", "Deployment")


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Tracked:
    """A pod this node runs, and what it last reported."""

    proc: PodProcess
    owner: tuple[str, str]  # (kind, name)
    revision: str
    reported: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeAgent:
    """Runs the pods of one namespace's workloads; `start`/`stop`, or use as a context manager."""

    api: kubernetes.client.ApiClient
    namespace: str
    image_env: Mapping[str, str]
    poll_s: float = 0.3
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="disagg-node-")))
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.net = PodNetwork()
        self.pods: dict[str, Tracked] = {}
        self._terminating: dict[str, Tracked] = {}
        self._failed: dict[str, str] = {}  # pod name -> the revision that could not run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-agent", daemon=True)
        self._lock = threading.Lock()
        self._core = kubernetes.client.CoreV1Api(self.api)
        self._apps = kubernetes.client.AppsV1Api(self.api)
        self._workload_status: dict[tuple[str, str], dict[str, Any]] = {}
        self.sd_file = self.workdir / "pods.json"
        self.sd_file.write_text("[]")
        self._forwards: list[_Forward] = []
        self._services: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[float, str, str]] = []  # (wall time, what, pod): created/ready/deleted

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        self.net.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for f in self._forwards:
            f.close()
        for t in [*self.pods.values(), *self._terminating.values()]:
            t.proc.kill()
        self.pods.clear()
        self._terminating.clear()
        self.net.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # keep the node up; the test reads `errors`
                log.exception("node agent sync failed")
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)

    # ---- one pass ----------------------------------------------------------------------------------
    def sync(self) -> None:
        workloads = [("StatefulSet", o) for o in self._list("apis/apps/v1", "statefulsets")]
        workloads += [("Deployment", o) for o in self._list("apis/apps/v1", "deployments")]
        cluster = Cluster(
            config_maps={o["metadata"]["name"]: o.get("data") or {} for o in self._list("api/v1", "configmaps")},
            secrets={o["metadata"]["name"]: Cluster.decode_secret(o) for o in self._list("api/v1", "secrets")})
        self._services = {o["metadata"]["name"]: o for o in self._list("api/v1", "services")}
        api_pods = {o["metadata"]["name"]: o for o in self._list("api/v1", "pods")}
        now = time.monotonic()
        with self._lock:
            # Pods deleted in the API (by a user, or by garbage collection of their workload) stop.
            for name in [n for n in self.pods if n not in api_pods]:
                self._begin_termination(name, "deleted")
            wanted: set[str] = set()
            for kind, obj in workloads:
                wanted |= self._reconcile_workload(kind, obj, cluster, api_pods)
            for name in [n for n in self.pods if n not in wanted]:
                self._delete_pod(name)
            for t in self.pods.values():
                t.proc.refresh_volumes(cluster)
                t.proc.tick(now)
            self._reap(now)
            self._report_pods()
            for kind, obj in workloads:
                self._report_workload(kind, obj)
            self._publish_names()

    def _reconcile_workload(self, kind: str, obj: Mapping[str, Any], cluster: Cluster,
                            api_pods: Mapping[str, Any]) -> set[str]:
        """Create what the workload wants; returns the pod names it keeps."""
        name, spec = obj["metadata"]["name"], obj["spec"]
        replicas = int(spec.get("replicas", 1))
        template = spec["template"]
        revision = template_hash(template)
        mine = {n: t for n, t in self.pods.items() if t.owner == (kind, name)}
        if kind == "StatefulSet":
            wanted = {f"{name}-{i}" for i in range(replicas)}
            # Replace outdated pods one at a time from the top ordinal, each once the rest are ready.
            outdated = sorted((n for n, t in mine.items() if n in wanted and t.revision != revision),
                              key=lambda n: int(n.rsplit("-", 1)[1]), reverse=True)
            if outdated and all(t.proc.ready for n, t in mine.items() if n not in outdated):
                self._delete_pod(outdated[0])
                mine.pop(outdated[0])
            for n in sorted(wanted):
                if n not in self.pods and n not in self._terminating and self._failed.get(n) != revision:
                    self._create_pod(kind, obj, n, revision, cluster,
                                     hostname=n, subdomain=spec.get("serviceName"))
            return {n for n in wanted if n in self.pods}
        # Deployment: surge the new revision, then retire the old once enough new pods are ready.
        current = [n for n, t in mine.items() if t.revision == revision]
        if revision in self._failed.values():
            return set(mine)
        for _ in range(replicas - len(current)):
            n = f"{name}-{revision[:8]}-{os.urandom(3).hex()[:5]}"
            self._create_pod(kind, obj, n, revision, cluster)
            current.append(n)
        keep = set(current[:replicas])
        ready_new = sum(1 for n in keep if n in self.pods and self.pods[n].proc.ready)
        if ready_new >= replicas:
            return keep
        return keep | {n for n, t in mine.items() if t.revision != revision}

    def _create_pod(self, kind: str, owner: Mapping[str, Any], name: str, revision: str, cluster: Cluster, *,
                    hostname: str | None = None, subdomain: str | None = None) -> None:
        template = owner["spec"]["template"]
        spec = json.loads(json.dumps(template["spec"]))
        if hostname:
            spec["hostname"], spec["subdomain"] = hostname, subdomain
        spec["nodeName"] = "e2e-node"
        meta = template.get("metadata") or {}
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": self.namespace,
                             "labels": {**(meta.get("labels") or {}), TEMPLATE_HASH: revision},
                             "annotations": dict(meta.get("annotations") or {}),
                             "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": kind,
                                                  "name": owner["metadata"]["name"],
                                                  "uid": owner["metadata"].get("uid", ""), "controller": True}]},
                "spec": spec}
        key = f"{self.namespace}/{name}"
        iface = self.net.add(key)
        try:
            created = self._core.create_namespaced_pod(self.namespace, body, _preload_content=False)
            body = json.loads(created.data)
            proc = PodProcess.create(body, iface, cluster, self.workdir / "pods" / name, self.image_env)
        except PodSpecError as exc:
            # What the manifest asks cannot run: the pod fails for good (a kubelet reports it the same way).
            self.net.remove(key)
            self.errors.append(f"pod {name}: {exc}")
            self._failed[name] = revision
            self._patch_pod_status(name, {"phase": "Failed", "reason": "UnsupportedSpec", "message": str(exc)})
            return
        self.pods[name] = Tracked(proc=proc, owner=(kind, owner["metadata"]["name"]), revision=revision)
        self.events.append((time.time(), "created", name))

    def _delete_pod(self, name: str) -> None:
        try:
            self._core.delete_namespaced_pod(name, self.namespace, _preload_content=False)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        self._begin_termination(name, "deleted")

    def _begin_termination(self, name: str, why: str) -> None:
        tracked = self.pods.pop(name, None)
        if tracked is None:
            return
        tracked.proc.terminate()
        self._terminating[name] = tracked
        self.events.append((time.time(), why, name))

    def _reap(self, now: float) -> None:
        for name, t in list(self._terminating.items()):
            if t.proc.reap(now):
                del self._terminating[name]
                self.net.remove(t.proc.key)
                self.events.append((time.time(), "exited", name))

    # ---- reporting ---------------------------------------------------------------------------------
    def _report_pods(self) -> None:
        for name, t in self.pods.items():
            status = t.proc.status()
            if status != t.reported:
                if status["conditions"][0]["status"] == "True" and not (
                        t.reported and t.reported["conditions"][0]["status"] == "True"):
                    self.events.append((time.time(), "ready", name))
                self._patch_pod_status(name, status)
                t.reported = status

    def _patch_pod_status(self, name: str, status: dict[str, Any]) -> None:
        try:
            self._core.patch_namespaced_pod_status(name, self.namespace, {"status": status}, _preload_content=False)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise

    def _report_workload(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = obj["metadata"]["name"]
        revision = template_hash(obj["spec"]["template"])
        mine = [t for t in self.pods.values() if t.owner == (kind, name)]
        updated = [t for t in mine if t.revision == revision]
        status = {"observedGeneration": obj["metadata"].get("generation", 1), "replicas": len(mine),
                  "readyReplicas": sum(t.proc.ready for t in mine),
                  "availableReplicas": sum(t.proc.ready for t in mine),
                  "updatedReplicas": len(updated), "currentReplicas": len(updated)}
        if self._workload_status.get((kind, name)) == status:
            return
        body = {"status": status}
        if kind == "StatefulSet":
            self._apps.patch_namespaced_stateful_set_status(name, self.namespace, body, _preload_content=False)
        else:
            self._apps.patch_namespaced_deployment_status(name, self.namespace, body, _preload_content=False)
        self._workload_status[(kind, name)] = status

    def _publish_names(self) -> None:
        """Cluster DNS for the pods, and Prometheus' view of them."""
        names: dict[str, str] = {}
        suffixes = (f".{self.namespace}.svc.cluster.local", f".{self.namespace}.svc", f".{self.namespace}")
        for t in self.pods.values():
            spec = t.proc.pod["spec"]
            if spec.get("hostname") and spec.get("subdomain"):
                for s in suffixes:
                    names[f"{spec['hostname']}.{spec['subdomain']}{s}"] = t.proc.iface.ip
        self.net.set_hosts(names)
        targets = pod_scrape.file_sd_targets([t.proc for t in self.pods.values()])
        text = json.dumps(targets, sort_keys=True)
        if self.sd_file.read_text() != text:
            tmp = self.sd_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.sd_file)

    # ---- reads for tests ---------------------------------------------------------------------------
    def ready_pods(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n, t in self.pods.items() if n.startswith(prefix) and t.proc.ready)

    def logs(self, name: str) -> str:
        with self._lock:
            t = self.pods.get(name) or self._terminating.get(name)
            return "\n".join(f"[{c.name}]\n{c.log_tail()}" for c in t.proc.containers) if t else ""

    def all_logs(self) -> str:
        with self._lock:
            names = [*self.pods, *self._terminating]
        return "\n".join(f"==== {n}\n{self.logs(n)}" for n in names)

    def endpoints(self, service: str, port: str | int) -> list[tuple[str, int]]:
        """Ready pods behind a Service, with the target port resolved (what an Endpoints object holds)."""
        svc = self._services.get(service)
        if svc is None:
            return []
        selector = svc["spec"].get("selector") or {}
        ports = svc["spec"].get("ports") or []
        sp = next((p for p in ports if p.get("name") == port or p.get("port") == port), ports[0] if ports else None)
        if sp is None:
            return []
        target = sp.get("targetPort", sp["port"])
        out = []
        with self._lock:
            for t in self.pods.values():
                labels = t.proc.pod["metadata"].get("labels") or {}
                if not t.proc.ready or any(labels.get(k) != v for k, v in selector.items()):
                    continue
                for c in t.proc.pod["spec"]["containers"]:
                    for p in c.get("ports") or []:
                        if target in (p.get("name"), p.get("containerPort")):
                            out.append((t.proc.iface.ip, int(p["containerPort"])))
        return out

    @contextmanager
    def port_forward(self, service: str, port: str | int = "http") -> Iterator[str]:
        """`kubectl port-forward svc/<service>`: a local URL whose connections go to the Service's ready
        pods (round robin, re-resolved per connection)."""
        forward = _Forward(lambda: self.endpoints(service, port)).start()
        self._forwards.append(forward)
        try:
            yield f"http://127.0.0.1:{forward.port}"
        finally:
            forward.close()
            self._forwards.remove(forward)

    def _list(self, group: str, plural: str) -> list[dict[str, Any]]:
        resp = self.api.call_api(*self.api.param_serialize(
            "GET", f"/{group}/namespaces/{self.namespace}/{plural}", header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"]))
        resp.read()
        items = json.loads(resp.data or b"{}").get("items") or []
        return [i for i in items if not (i.get("metadata") or {}).get("deletionTimestamp")]


class _Forward:
    """A TCP forwarder on 127.0.0.1 to whatever `targets()` lists at connection time."""

    def __init__(self, targets) -> None:
        self._targets = targets
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="port-forward", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._next = 0
        self.port = 0

    def start(self) -> _Forward:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        targets = self._targets()
        if not targets:
            writer.close()
            return
        host, port = targets[self._next % len(targets)]
        self._next += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    dst.close()
                except RuntimeError:
                    pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
