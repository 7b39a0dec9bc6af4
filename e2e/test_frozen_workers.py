"""Workers stopped with SIGSTOP (the process frozen, its socket still accepting): requests routed to one end
within the router's configured timeout, the router marks it down, and a frozen decode side turns new
requests away with 503 + Retry-After before any prefill work."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import contextmanager

import aiohttp
import pytest
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

TIMEOUT_S = 3.0
SLACK_S = 12.0  # a loaded 2-core machine: process scheduling, polls, the retry on another instance


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("frozen") / "tiny-llama", seed=13)


@contextmanager
def frozen(proc):
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def readyz(s: aiohttp.ClientSession, url: str) -> dict:
    async with s.get(f"{url}/readyz") as resp:
        return await resp.json()


async def post(s: aiohttp.ClientSession, url: str, prompt: list[int]) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    async with s.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}) as resp:
        return resp.status, {"body": await resp.json(), "retry": resp.headers.get("Retry-After")}, time.monotonic() - t0


async def test_sigstopped_workers_end_requests_in_the_timeout_and_are_marked_down(model_dir):
    cluster = LocalCluster(model_dir=model_dir, port=0, prefill_workers=2,
                           worker_args=["--device", "cpu", "--num-kv-blocks", "256"],
                           router_args=["--response-timeout", str(TIMEOUT_S), "--heartbeat-timeout", str(TIMEOUT_S)])
    with cluster:
        async with aiohttp.ClientSession() as s:
            assert (await post(s, cluster.url, [5, 6, 7]))[0] == 200
            with frozen(cluster.processes["prefill-0"]):
                results = await asyncio.gather(*(post(s, cluster.url, [5 + i, 6, 7]) for i in range(6)))
                assert [st for st, _, _ in results] == [200] * 6  # the frozen one's share went to prefill-1
                assert max(t for _, _, t in results) < TIMEOUT_S + SLACK_S
                ready = await readyz(s, cluster.url)
                assert ready["prefill"] == 1 and ready["decode"] == 1
            with frozen(cluster.processes["decode-0"]):
                status, _, took = await post(s, cluster.url, [9, 9, 9])
                assert status in (503, 504) and took < TIMEOUT_S + SLACK_S
                deadline = time.monotonic() + 20
                while (await readyz(s, cluster.url))["decode"] != 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                status, reply, took = await post(s, cluster.url, [9, 9, 9])
                assert status == 503 and reply["retry"] and "decode" in reply["body"]["error"]["message"]
                assert took < TIMEOUT_S  # refused up front: no prefill, no waiting on the frozen one
            # Thawed, both come back once their polls answer.
            deadline = time.monotonic() + 30
            while (await readyz(s, cluster.url)) != {"prefill": 2, "decode": 1, "colocated": 0, "draining": False}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            assert (await post(s, cluster.url, [5, 6, 7]))[0] == 200
