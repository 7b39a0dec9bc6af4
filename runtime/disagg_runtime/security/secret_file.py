"""A mounted Secret file (one value a line), re-read when Kubernetes swaps it.

Kubernetes updates a Secret volume by pointing a symlink at a new directory, so the file the path
resolves to gets a new inode; a stat of the path (which follows links) tells that cheaply. The stat
and the read run in a worker thread every `poll_s`; requests only look at the values held in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from .compare import secret_digest

log = logging.getLogger(__name__)


class SecretFileError(Exception):
    """The secret file cannot be read or holds no value (at start-up: the process refuses to start)."""


def parse_values(text: str) -> tuple[str, ...]:
    """Non-empty lines, stripped; lines starting with # are comments."""
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


class SecretFile:
    """The values of one secret file; `values` is what the file held at its last change."""

    def __init__(self, path: str | Path, *, what: str, poll_s: float = 2.0) -> None:
        self.path = Path(path)
        self.what = what
        self.poll_s = poll_s
        self._signature: tuple[int, int, int, int] | None = None
        self._values: tuple[str, ...] = ()
        self._digests: tuple[bytes, ...] = ()
        self.reload()
        if not self._values:
            raise SecretFileError(f"{what} file {self.path} holds no value (one a line, # for comments)")

    @property
    def values(self) -> tuple[str, ...]:
        return self._values

    @property
    def digests(self) -> tuple[bytes, ...]:
        """The values' digests (security/tokens.py compares in those), computed once per change."""
        return self._digests

    def reload(self) -> bool:
        """Re-read the file if it changed; True if the values changed. Blocking: call it off the event loop."""
        try:
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return False
            values = parse_values(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            if self._signature is None:
                raise SecretFileError(f"cannot read the {self.what} file {self.path}: {e}") from e
            # Kubernetes never leaves the path missing mid-update; keep serving with what was read last.
            log.warning("cannot re-read the %s file %s (keeping the last values): %s", self.what, self.path, e)
            return False
        first = self._signature is None
        self._signature = signature
        if not values:
            log.warning("the %s file %s is now empty; keeping the last values", self.what, self.path)
            return False
        changed = values != self._values
        self._values, self._digests = values, tuple(secret_digest(v) for v in values)
        if changed and not first:
            log.info("re-read the %s file %s: %d value(s)", self.what, self.path, len(values))  # never the values
        return changed

    async def watch(self) -> None:
        """Re-read the file every `poll_s` until cancelled."""
        while True:
            await asyncio.sleep(self.poll_s)
            await asyncio.to_thread(self.reload)

    def attach(self, app: web.Application) -> None:
        """Watch the file for as long as `app` runs."""

        async def watching(_app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(self.watch())
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.cleanup_ctx.append(watching)
