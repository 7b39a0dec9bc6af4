"""One pod's containers as local processes: what a kubelet and a container runtime do, from the manifest.

Only what the pod spec says is used, so a rendered argument, variable, probe or port that the runtime
does not honour shows up as a pod that never becomes ready (or a test that fails):
- `command` + `args`, with `$(VAR)` expanded from the container's environment as Kubernetes does, and the
  image's environment (`image_env`: the executables and Python path of this checkout) underneath;
- `env` (`value`, and `valueFrom` field/Secret/ConfigMap references) and `envFrom`;
- volumes (`configMap`, `secret`, `emptyDir`) written to a per-pod directory and bind-mounted at each
  `volumeMount`'s path (read-only where asked) in a private mount namespace, so `/etc/disagg` is each
  pod's own;
- `workingDir`; every container in the pod's network namespace (podnet.py), as containers share one;
- `readinessProbe` and `livenessProbe` (`tcpSocket`, `httpGet`, `exec`) with their periods and thresholds;
- restart on exit (`restartPolicy: Always`) with back-off; SIGTERM, `terminationGracePeriodSeconds`, then
  SIGKILL on deletion.

Not emulated, and said so: images (every container runs this checkout), resource limits and GPUs,
`runAsUser` (the interpreter here lives under a root-only home) and a read-only root filesystem.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .podnet import PodInterface

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


class PodSpecError(ValueError):
    """A manifest asks for something this node cannot do (an unknown volume type, a missing key)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`, others stay."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


@dataclass(frozen=True)
class Cluster:
    """What a pod's references resolve against: its namespace's ConfigMaps and Secrets (decoded)."""

    config_maps: Mapping[str, Mapping[str, str]]
    secrets: Mapping[str, Mapping[str, str]]

    @staticmethod
    def decode_secret(obj: Mapping[str, Any]) -> dict[str, str]:
        out = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        out.update(obj.get("stringData") or {})
        return out


def pod_env(pod: Mapping[str, Any], container: Mapping[str, Any], cluster: Cluster, pod_ip: str,
            image_env: Mapping[str, str]) -> dict[str, str]:
    """The process environment of one container: the image's, then envFrom, then env (later wins)."""
    env = dict(image_env)
    env["HOSTNAME"] = pod["metadata"]["name"]
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            env.update({prefix + k: v for k, v in _lookup(cluster.config_maps, source["configMapRef"]).items()})
        elif "secretRef" in source:
            env.update({prefix + k: v for k, v in _lookup(cluster.secrets, source["secretRef"]).items()})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
        elif "valueFrom" in var:
            value = _value_from(pod, var["valueFrom"], cluster, pod_ip)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = ""
    return env


def _lookup(store: Mapping[str, Mapping[str, str]], ref: Mapping[str, Any]) -> Mapping[str, str]:
    if ref["name"] not in store:
        if ref.get("optional"):
            return {}
        raise PodSpecError(f"{ref['name']!r} does not exist")
    return store[ref["name"]]


def _value_from(pod: Mapping[str, Any], source: Mapping[str, Any], cluster: Cluster, pod_ip: str) -> str | None:
    meta = pod["metadata"]
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", ""),
                  "metadata.uid": meta.get("uid", ""), "status.podIP": pod_ip, "status.hostIP": pod_ip,
                  "spec.nodeName": pod.get("spec", {}).get("nodeName", "e2e-node"),
                  "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default")}
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path not in fields:
            raise PodSpecError(f"fieldRef {path!r} is not supported by the e2e node")
        return fields[path]
    for kind, store in (("secretKeyRef", cluster.secrets), ("configMapKeyRef", cluster.config_maps)):
        if kind in source:
            ref = source[kind]
            data = _lookup(store, ref)
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise PodSpecError(f"{kind} {ref['name']}/{ref['key']}: no such key")
            return data[ref["key"]]
    raise PodSpecError(f"valueFrom {sorted(source)} is not supported by the e2e node")


def write_volumes(pod: Mapping[str, Any], cluster: Cluster, root: Path) -> dict[str, Path]:
    """Materialise the pod's volumes under `root` (again on every call: ConfigMap edits reach pods, as
    kubelet's periodic sync does); returns volume name -> directory."""
    out: dict[str, Path] = {}
    for vol in pod["spec"].get("volumes") or []:
        path = root / vol["name"]
        path.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol:
            pass
        elif "configMap" in vol or "secret" in vol:
            ref = vol.get("configMap") or vol.get("secret")
            name = ref.get("name") or ref.get("secretName")
            store = cluster.config_maps if "configMap" in vol else cluster.secrets
            data = _lookup(store, {"name": name, "optional": ref.get("optional")})
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    raise PodSpecError(f"volume {vol['name']}: {name} has no key {item['key']!r}")
                _write_atomic(path / item["path"], data[item["key"]])
        else:
            kinds = sorted(set(vol) - {"name"})
            raise PodSpecError(f"volume {vol['name']}: type {kinds} is not supported by the e2e node")
        out[vol["name"]] = path
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader sees the old file or the new one, never half of one


@dataclass
class Probe:
    """A readiness or liveness probe's state, run on its own period."""

    spec: Mapping[str, Any]
    ports: Mapping[str, int]
    successes: int = 0
    failures: int = 0
    passing: bool = False
    next_at: float = 0.0

    def due(self, now: float, started: float) -> bool:
        return now >= max(self.next_at, started + float(self.spec.get("initialDelaySeconds", 0)))

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + float(self.spec.get("periodSeconds", 10))
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.spec.get("successThreshold", 1)):
                self.passing = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.spec.get("failureThreshold", 3)):
                self.passing = False

    def port(self, value: Any) -> int:
        if isinstance(value, int):
            return value
        if str(value).isdigit():
            return int(value)
        if value not in self.ports:
            raise PodSpecError(f"probe names port {value!r}, which the container does not declare")
        return self.ports[value]


def run_probe(probe: Probe, iface: PodInterface) -> bool:
    spec, timeout = probe.spec, float(probe.spec.get("timeoutSeconds", 1))
    try:
        if "tcpSocket" in spec:
            with socket.create_connection((iface.ip, probe.port(spec["tcpSocket"]["port"])), timeout=timeout):
                return True
        if "httpGet" in spec:
            get = spec["httpGet"]
            url = f"http://{iface.ip}:{probe.port(get['port'])}{get.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                return 200 <= r.status < 400
        if "exec" in spec:
            done = subprocess.run([*iface.exec_prefix(), *spec["exec"]["command"]], capture_output=True,
                                  timeout=timeout)
            return done.returncode == 0
    except urllib.error.HTTPError as e:
        return 200 <= e.code < 400
    except (OSError, subprocess.TimeoutExpired):
        return False
    raise PodSpecError(f"probe {sorted(spec)} has no handler the e2e node supports")


@dataclass
class ContainerProcess:
    """One container: its process (restarted on exit), probes and log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    readiness: Probe | None
    liveness: Probe | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float = 0.0
    last_exit: int | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        log.write(f"--- start {time.strftime('%H:%M:%S')} {shlex.join(self.argv[-12:])}\n".encode())
        log.flush()
        # Own process group: deletion signals the container's whole tree.
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.started = time.monotonic()
        for probe in (self.readiness, self.liveness):
            if probe is not None:
                probe.passing, probe.successes, probe.failures, probe.next_at = False, 0, 0, 0.0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        return self.running and (self.readiness is None or self.readiness.passing)

    def signal(self, sig: int) -> None:
        if self.running:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class PodProcess:
    """A running pod: its network, volumes and containers."""

    key: str  # namespace/name
    pod: dict[str, Any]
    iface: PodInterface
    root: Path
    containers: list[ContainerProcess] = field(default_factory=list)
    terminating_since: float | None = None

    @classmethod
    def create(cls, pod: dict[str, Any], iface: PodInterface, cluster: Cluster, root: Path,
               image_env: Mapping[str, str]) -> PodProcess:
        root.mkdir(parents=True, exist_ok=True)
        volumes = write_volumes(pod, cluster, root / "volumes")
        out = cls(key=f"{pod['metadata']['namespace']}/{pod['metadata']['name']}", pod=pod, iface=iface, root=root)
        for c in pod["spec"]["containers"]:
            env = pod_env(pod, c, cluster, iface.ip, image_env)
            ports = {p["name"]: int(p["containerPort"]) for p in c.get("ports") or [] if p.get("name")}
            argv = [*iface.exec_prefix(), "/bin/sh", "-c", _mount_script(c, volumes), "sh",
                    *_command(c, env)]
            out.containers.append(ContainerProcess(
                name=c["name"], argv=argv, env=env, log_path=root / f"{c['name']}.log",
                readiness=Probe(c["readinessProbe"], ports) if c.get("readinessProbe") else None,
                liveness=Probe(c["livenessProbe"], ports) if c.get("livenessProbe") else None))
        for c in out.containers:
            c.start()
        return out

    def refresh_volumes(self, cluster: Cluster) -> None:
        write_volumes(self.pod, cluster, self.root / "volumes")

    @property
    def ready(self) -> bool:
        return self.terminating_since is None and all(c.ready for c in self.containers)

    def tick(self, now: float) -> None:
        """Probe what is due; restart what exited (with back-off) or failed its liveness probe."""
        if self.terminating_since is not None:
            return
        for c in self.containers:
            if not c.running:
                if c.proc is not None and c.last_exit is None:
                    c.last_exit = c.proc.returncode
                    c.restart_at = now + min(10.0, 0.5 * 2 ** c.restarts)
                if now >= c.restart_at:
                    c.restarts += 1
                    c.last_exit = None
                    c.start()
                continue
            for probe in (c.readiness, c.liveness):
                if probe is not None and probe.due(now, c.started):
                    probe.record(run_probe(probe, self.iface), now)
            if c.liveness is not None and c.liveness.failures >= int(c.liveness.spec.get("failureThreshold", 3)):
                c.signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM every container (the runtime drains on it); `reap` finishes the job."""
        if self.terminating_since is None:
            self.terminating_since = time.monotonic()
            for c in self.containers:
                c.signal(signal.SIGTERM)

    def reap(self, now: float) -> bool:
        """True once every container has exited; SIGKILL after the grace period."""
        assert self.terminating_since is not None
        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        if now - self.terminating_since > grace:
            for c in self.containers:
                c.signal(signal.SIGKILL)
        return not any(c.running for c in self.containers)

    def kill(self) -> None:
        for c in self.containers:
            c.signal(signal.SIGKILL)
            if c.proc is not None:
                try:
                    c.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass

    def status(self) -> dict[str, Any]:
        ready = self.ready
        statuses = [{"name": c.name, "ready": c.ready, "restartCount": c.restarts, "image": "local", "imageID": "local",
                     "state": {"running": {}} if c.running else {"waiting": {"reason": "CrashLoopBackOff"}}}
                    for c in self.containers]
        cond = "True" if ready else "False"
        return {"phase": "Running", "podIP": self.iface.ip, "hostIP": self.iface.ip,
                "podIPs": [{"ip": self.iface.ip}],
                "conditions": [{"type": "Ready", "status": cond}, {"type": "ContainersReady", "status": cond}],
                "containerStatuses": statuses}


def _command(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    command = [expand(str(a), env) for a in container.get("command") or []]
    args = [expand(str(a), env) for a in container.get("args") or []]
    if not command:
        raise PodSpecError(f"container {container['name']}: no command (images' entrypoints are not emulated)")
    exe = shutil.which(command[0], path=env.get("PATH"))
    if exe is None:
        raise PodSpecError(f"container {container['name']}: {command[0]!r} is not on the image's PATH")
    return [exe, *command[1:], *args]


def _mount_script(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> str:
    """Shell run inside the pod's own mount namespace (`ip netns exec` makes one): bind each volume at its
    mount path, then exec the container's command."""
    lines = ["set -e"]
    for m in container.get("volumeMounts") or []:
        if m["name"] not in volumes:
            raise PodSpecError(f"container {container['name']} mounts {m['name']!r}, which the pod does not declare")
        src = volumes[m["name"]] / m["subPath"] if m.get("subPath") else volumes[m["name"]]
        dst = shlex.quote(m["mountPath"])
        lines.append(f"[ -e {dst} ] || mkdir -p {dst}" if src.is_dir() or not m.get("subPath")
                     else f"[ -e {dst} ] || touch {dst}")
        lines.append(f"mount --bind {shlex.quote(str(src))} {dst}")
        if m.get("readOnly"):
            lines.append(f"mount -o remount,bind,ro {dst}")
    if container.get("workingDir"):
        lines.append(f"cd {shlex.quote(container['workingDir'])}")
    lines.append('exec "$@"')
    return "\n".join(lines)
