"""Router and workers in one event loop (tests and benchmarks): same apps as the processes, no spawning."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from aiohttp import web

from ..router.app import Router, RouterConfig
from ..workers.base import Worker
from .runner import start_site


@dataclass
class InProcessDeployment:
    """Serves `prefill`, `decode` and `colocated` workers and a router on free loopback ports; `url` is the
    router's."""

    prefill: list[Worker]
    decode: list[Worker]
    router_config: RouterConfig = field(default_factory=lambda: RouterConfig(prefill=[], decode=[]))
    host: str = "127.0.0.1"
    url: str = ""
    router: Router | None = None
    worker_urls: dict[int, str] = field(default_factory=dict)  # id(worker) -> base URL
    colocated: list[Worker] = field(default_factory=list)
    _runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self) -> str:
        endpoints: dict[str, list[str]] = {"prefill": [], "decode": [], "colocated": []}
        for role, workers in (("prefill", self.prefill), ("decode", self.decode), ("colocated", self.colocated)):
            for w in workers:
                runner, port = await start_site(w.app(), self.host, 0)
                self._runners.append(runner)
                endpoints[role].append(f"{self.host}:{port}")
                self.worker_urls[id(w)] = f"http://{self.host}:{port}"
        config = replace(self.router_config, prefill=endpoints["prefill"], decode=endpoints["decode"],
                         colocated=endpoints["colocated"])
        self.router = Router(config)
        runner, port = await start_site(self.router.app(), self.host, 0)
        self._runners.append(runner)
        self.url = f"http://{self.host}:{port}"
        return self.url

    async def stop(self) -> None:
        # Router first, so no new work reaches workers that are shutting down.
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> InProcessDeployment:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
