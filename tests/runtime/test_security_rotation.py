"""A token rotation under traffic, with the real router and workers: the router's endpoint list goes
through the states the operator writes (old pods, old + new, new), the router's mounted token file is
swapped as kubelet would, a second (new) router joins, and no request fails."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
from aiohttp import web
from disagg_runtime.engine import Engine
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import Router, RouterConfig
from disagg_runtime.serve.runner import start_site
from disagg_runtime.workers.base import Worker, WorkerConfig
from disagg_runtime.workers.decode import DecodeWorker
from disagg_runtime.workers.prefill import PrefillWorker

OLD, NEW = "old-" + "a" * 40, "new-" + "b" * 40


def _write(path, text: str) -> str:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a new inode, as kubelet's symlink swap gives
    return str(path)


def _steps(worker: Worker) -> float:
    for metric in worker.registry.collect():
        if metric.name == "disagg_engine_step_seconds":
            return next((s.value for s in metric.samples if s.name.endswith("_count")), 0.0)  # none before a first step
    return 0.0


async def _until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_requests_keep_succeeding_through_a_token_rotation(tmp_path):
    model = write_random_model(tmp_path / "tiny", seed=11)
    old_file = _write(tmp_path / "old-token", OLD + "\n")
    new_file = _write(tmp_path / "new-token", f"{NEW}\n{OLD}\n")  # what the rotated Secret holds
    router_file = _write(tmp_path / "router-token", OLD + "\n")

    def worker(cls, token_file):
        return cls(Engine.load(model, num_blocks=256), WorkerConfig(internal_token_file=token_file))

    old = [worker(PrefillWorker, old_file), worker(DecodeWorker, old_file)]
    new = [worker(PrefillWorker, new_file), worker(DecodeWorker, new_file)]
    runners, urls = {}, {}
    for w in old + new:
        runners[id(w)], port = await start_site(w.app(), "127.0.0.1", 0)
        urls[id(w)] = f"http://127.0.0.1:{port}"
    endpoints = tmp_path / "endpoints.json"

    def list_endpoints(*workers: Worker) -> None:
        doc = {role: [urls[id(w)] for w in workers if w.role == role] for role in ("prefill", "decode")}
        _write(endpoints, json.dumps(doc))

    list_endpoints(*old)
    routers: list[tuple[Router, web.AppRunner]] = []

    async def start_router(token_file: str):
        router = Router(RouterConfig(prefill=[], decode=[], endpoints_file=str(endpoints), poll_s=0.2,
                                     internal_token_file=token_file))
        runner, port = await start_site(router.app(), "127.0.0.1", 0)
        routers.append((router, runner))
        return f"http://127.0.0.1:{port}"

    router_urls = [await start_router(router_file)]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic(session: aiohttp.ClientSession, lane: int) -> None:
        i = 0
        while not stop.is_set():
            url = router_urls[(lane + i) % len(router_urls)]
            body = {"prompt": f"request {lane} {i}", "max_tokens": 4, "temperature": 0}
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                statuses.append(resp.status)
                await resp.read()
            i += 1

    try:
        async with aiohttp.ClientSession() as session:
            await _until(lambda: routers[0][0].pool.ready_to_serve, "the old pods to serve")
            lanes = [asyncio.create_task(traffic(session, lane)) for lane in range(2)]

            # Rolling out: the new pods come up beside the old ones and are listed with them.
            list_endpoints(*old, *new)
            await _until(lambda: len(routers[0][0].pool.ready("prefill")) == 2, "the new pods in the list")
            await _until(lambda: _steps(new[0]) > 0, "the new prefill worker to serve")
            # The old router pod's mounted Secret is updated; a new router pod (new Secret) starts.
            _write(tmp_path / "router-token", f"{NEW}\n{OLD}\n")
            router_urls.append(await start_router(new_file))
            await _until(lambda: routers[1][0].pool.ready_to_serve, "the new router")
            count = len(statuses)
            await _until(lambda: len(statuses) > count + 8, "traffic through both routers")

            # Rollout complete: the old pods leave the list, drain and stop.
            list_endpoints(*new)
            await _until(lambda: all(len(r.pool.ready("prefill")) == 1 for r, _ in routers), "old pods delisted")
            for w in old:
                w.start_drain()
            await asyncio.wait_for(asyncio.gather(*(w.drained.wait() for w in old)), 60)
            for w in old:
                await runners.pop(id(w)).cleanup()
            count = len(statuses)
            await _until(lambda: len(statuses) > count + 8, "traffic on the new pods only")
            stop.set()
            await asyncio.gather(*lanes)
    finally:
        stop.set()
        for _, runner in routers:
            await runner.cleanup()
        for runner in runners.values():
            await runner.cleanup()
    assert len(statuses) > 16 and _steps(old[0]) > 0 and _steps(new[0]) > 0
    assert set(statuses) == {200}, [s for s in statuses if s != 200]
