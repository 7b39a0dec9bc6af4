"""Run one aiohttp app until SIGINT/SIGTERM; SIGTERM drains a worker first (Kubernetes rollouts)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)


async def start_site(app: web.Application, host: str, port: int, *,
                     shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, int]:
    """Start serving `app`; returns the runner and the bound port (`port` 0 picks a free one).

    `shutdown_timeout`: how long the runner's cleanup waits for handlers still running before it cancels
    them (aiohttp's default)."""
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the request.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # aiohttp exposes no public accessor for port 0
    return runner, bound


def announce(**fields: object) -> None:
    """One JSON line on stdout, which the --local launcher reads to learn the ports."""
    sys.stdout.write(json.dumps({"event": "listening", **fields}) + "\n")
    sys.stdout.flush()


async def serve_until_stopped(app: web.Application, host: str, port: int, *,
                              drain: Callable[[], None] | None = None, drained: asyncio.Event | None = None,
                              extra: Callable[[], dict] | None = None) -> None:
    """Serve until SIGINT, or until `drained` is set (SIGTERM and POST /drain call `drain` to start that)."""
    runner, bound = await start_site(app, host, port)
    announce(port=bound, **(extra() if extra else {}))
    log.info("listening on %s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, drain if drain is not None else stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    waits = [asyncio.create_task(stop.wait())]
    if drained is not None:
        waits.append(asyncio.create_task(drained.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await runner.cleanup()
