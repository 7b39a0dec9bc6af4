"""Endpoint names to worker URLs, without letting a slow lookup hold up the router's polls.

Headless-service names of pods that do not exist yet (a rollout lists the new pods before the
StatefulSet creates them) may take a resolver's full timeout to fail: 10 s inside a pod whose
nameserver does not answer, and one such name per poll round would freeze every worker's health for
that long. So each name has at most one lookup in flight, a round waits for it only `wait_s`, and a
lookup still running leaves the name at what it last resolved to (its result counts from the next round).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

# (host, port) -> the addresses it resolves to; OSError when it does not resolve.
Lookup = Callable[[str, int], Awaitable[list[str]]]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` (or a URL) -> (host, port); ValueError when there is no port."""
    host, _, port = endpoint.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"worker endpoint {endpoint!r} must be host:port")
    return host.strip("[]"), int(port)


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def system_lookup(host: str, port: int) -> list[str]:
    """Every address of `host`, through the event loop's resolver (a thread, as getaddrinfo blocks)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({i[4][0] for i in infos})


@dataclass
class _Name:
    urls: list[str]
    task: asyncio.Task[list[str]] | None = None


class EndpointResolver:
    """Resolves endpoints each poll round; a name that does not resolve maps to its own URL (polled, unhealthy)."""

    def __init__(self, *, wait_s: float = 1.0, lookup: Lookup = system_lookup) -> None:
        self.wait_s = wait_s
        self._lookup = lookup
        self._names: dict[str, _Name] = {}

    async def resolve_all(self, endpoints: Iterable[str]) -> dict[str, list[str]]:
        """endpoint -> its worker URLs, for every endpoint; lookups run side by side, each bounded by `wait_s`."""
        endpoints = list(dict.fromkeys(endpoints))
        for gone in set(self._names) - set(endpoints):
            self._forget(gone)
        urls = await asyncio.gather(*(self._resolve(e) for e in endpoints))
        return dict(zip(endpoints, urls, strict=True))

    async def _resolve(self, endpoint: str) -> list[str]:
        host, port = split_endpoint(endpoint)
        try:
            ipaddress.ip_address(host)
            return [url_of(host, port)]
        except ValueError:
            pass
        name = self._names.get(endpoint)
        if name is None:
            name = self._names[endpoint] = _Name(urls=[url_of(host, port)])
        if name.task is None:
            name.task = asyncio.create_task(self._lookup(host, port), name=f"resolve {host}")
        # wait() leaves the lookup running when the time is up, unlike wait_for.
        await asyncio.wait({name.task}, timeout=self.wait_s)
        if name.task.done():
            task, name.task = name.task, None
            try:
                addrs = task.result()
            except (OSError, UnicodeError):  # keep polling by name: it reports unhealthy until it resolves
                addrs = []
            name.urls = [url_of(a, port) for a in addrs] or [url_of(host, port)]
        return name.urls

    def _forget(self, endpoint: str) -> None:
        name = self._names.pop(endpoint)
        if name.task is not None:
            name.task.cancel()

    def close(self) -> None:
        """Cancel the lookups still running (the router is stopping)."""
        for endpoint in list(self._names):
            self._forget(endpoint)
