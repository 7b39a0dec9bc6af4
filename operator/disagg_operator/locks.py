"""One writer at a time per DisaggServing inside the operator process.

Three paths reconcile a resource and write its status: kopf's create/update/resume handlers, the
workload events that carry a rollout forward (readiness.py) and the re-planning loop. Each holds the
resource's lock from reading the resource to writing its status, so none acts on a status another
is about to replace (e.g. retiring a plan's workloads that a newer reconcile has just made current).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class KeyedLocks:
    """An asyncio.Lock per key, created on first use and dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
