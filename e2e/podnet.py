"""A pod network on this machine: one Linux network namespace per pod, joined by a bridge.

What a CNI plugin and cluster DNS give a real cluster, for the node agent (node_agent.py): every pod
gets its own network namespace, so every pod can bind the ports its manifest declares (8000 for two
workers is no clash), and its own address on a bridge in 198.18.0.0/15 (RFC 2544's range for
benchmark networks: no real network uses it, and nothing here leaves the machine). The test process,
Prometheus and the load generator stay in the root namespace and reach pods through the bridge's
address, as a node reaches its pods.

Names resolve through a hosts file per namespace: `ip netns exec` bind-mounts
/etc/netns/<namespace>/hosts over /etc/hosts for the process it starts, and glibc reads /etc/hosts on
every lookup, so `PodNetwork.set_hosts` (rewriting each file in place) is what DNS updates are to a
real cluster: a pod's stable StatefulSet name moves with it.

Needs root and `ip` (iproute2); `PodNetwork.unavailable_reason()` says why not, for skips.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


class PodNetworkError(RuntimeError):
    """A namespace, link or address could not be set up; carries the failing command's stderr."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PodNetworkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class PodInterface:
    """One pod's network: the namespace its processes run in and its address."""

    netns: str
    ip: str

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program inside this pod's namespace (and its hosts file)."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class PodNetwork:
    """The bridge and the namespaces of the pods on it; `close` removes every trace."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    _subnet: ipaddress.IPv4Network | None = None
    _pods: dict[str, PodInterface] = field(default_factory=dict)
    _free: list[str] = field(default_factory=list)
    _next_host: int = 2

    @staticmethod
    def unavailable_reason() -> str | None:
        """None when namespaces can be made here; else why not (not root, no iproute2)."""
        if os.geteuid() != 0:
            return "pod networks need root (network namespaces, veth pairs, a bridge)"
        if shutil.which("ip") is None:
            return "pod networks need iproute2's `ip`"
        return None

    @property
    def bridge(self) -> str:
        return f"dgbr{self.tag}"

    @property
    def gateway(self) -> str:
        assert self._subnet is not None
        return str(self._subnet.network_address + 1)

    def start(self) -> PodNetwork:
        # A /24 of 198.18.0.0/15 picked from the tag: concurrent runs on one machine get different ones.
        index = int(self.tag, 16) % 512
        self._subnet = ipaddress.ip_network(f"198.{18 + index // 256}.{index % 256}.0/24")
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except PodNetworkError:
            self.close()
            raise
        return self

    def add(self, pod_key: str) -> PodInterface:
        """A namespace with loopback and an address on the bridge for `pod_key` (namespace/name)."""
        assert self._subnet is not None, "start() first"
        if pod_key in self._pods:
            return self._pods[pod_key]
        if self._free:
            ip = self._free.pop()
        else:
            if self._next_host >= 254:
                raise PodNetworkError(f"pod network {self._subnet} is full")
            ip = str(self._subnet.network_address + self._next_host)
            self._next_host += 1
        suffix = ip.rsplit(".", 1)[1]
        netns, host_end = f"dg{self.tag}-{suffix}", f"dgv{self.tag}{suffix}"
        (NETNS_ETC / netns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / netns / "hosts").write_text("127.0.0.1 localhost\n")
        try:
            _ip("netns", "add", netns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        except PodNetworkError:
            self._remove_netns(netns)
            raise
        pod = PodInterface(netns=netns, ip=ip)
        self._pods[pod_key] = pod
        return pod

    def remove(self, pod_key: str) -> None:
        pod = self._pods.pop(pod_key, None)
        if pod is not None:
            self._remove_netns(pod.netns)
            self._free.append(pod.ip)

    def set_hosts(self, entries: Mapping[str, str]) -> None:
        """Every pod resolves `name -> ip` for each entry (what cluster DNS serves)."""
        lines = ["127.0.0.1 localhost"]
        by_ip: dict[str, list[str]] = {}
        for name, ip in sorted(entries.items()):
            by_ip.setdefault(ip, []).append(name)
        lines += [f"{ip} {' '.join(names)}" for ip, names in sorted(by_ip.items())]
        text = "\n".join(lines) + "\n"
        for pod in self._pods.values():
            path = NETNS_ETC / pod.netns / "hosts"
            # In place: running pods see the file through a bind mount of this very inode.
            with path.open("r+" if path.exists() else "w") as f:
                f.write(text)
                f.truncate()

    def close(self) -> None:
        for key in list(self._pods):
            self.remove(key)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    @staticmethod
    def _remove_netns(netns: str) -> None:
        # Deleting the namespace deletes its veth end, and with it the peer on the bridge.
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
