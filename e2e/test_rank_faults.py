"""A rank that dies takes its whole multi-rank instance out of service: kill -9 of one rank of a tp=2 decode
instance under load ends its requests with explicit errors, the router serves from the other instance,
and no rank of the broken instance is left behind (blocked on a collective or otherwise)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

from .conftest import complete

pytest.importorskip("deepspeed")


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the launcher's rank processes (read from their environment)."""
    out = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _until_unready(session: aiohttp.ClientSession, url: str) -> float:
    """When `url`/readyz stopped answering 200 (503, or nothing listening any more)."""
    while True:
        try:
            async with session.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status != 200:
                    return time.monotonic()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return time.monotonic()
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_kill_9_of_one_rank_of_a_tp2_decode_instance_under_load(tmp_path):
    model_dir = write_random_model(tmp_path / "llama", seed=12)
    cluster = LocalCluster(model_dir=model_dir, port=0, decode_workers=2, startup_timeout_s=240,
                           worker_args=["--device", "cpu", "--num-kv-blocks", "1024", "--collective-timeout", "5"],
                           role_args={"decode-0": ["--tp", "2"]}, router_args=["--heartbeat-timeout", "5"])
    with cluster:
        launcher = cluster.processes["decode-0"]
        ranks = _rank_pids(launcher.pid)
        assert sorted(ranks) == [0, 1]
        async with aiohttp.ClientSession() as s:
            started = [asyncio.Event() for _ in range(8)]
            ended: dict[int, float] = {}

            async def stream(i: int) -> list[bytes]:
                body = {"prompt": [5 + i, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
                events = []
                async with s.post(f"{cluster.url}/v1/completions", json=body) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            events.append(line[6:].strip())
                            if len(events) == 3:
                                started[i].set()
                ended[i] = time.monotonic()
                return events

            tasks = [asyncio.create_task(stream(i)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            os.kill(ranks[1], signal.SIGKILL)
            killed = time.monotonic()
            unready = await asyncio.wait_for(_until_unready(s, f"http://127.0.0.1:{cluster.ports['decode-0']}"), 30)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            after = await asyncio.wait_for(asyncio.gather(*(complete(s, cluster.url, [9, 9, i], stream=True)
                                                            for i in range(4))), 60)
            launcher.wait(30)
        gone = {r: not _alive(pid) for r, pid in ranks.items()}
    failed = [i for i, r in enumerate(results) if b'"error"' in r[-2]]
    completed = [i for i, r in enumerate(results) if b'"finish_reason":"length"' in r[-2]]
    assert failed and len(failed) + len(completed) == 8, [r[-2:] for r in results]
    assert all(results[i][-1] == b"[DONE]" for i in failed)
    # Every request of the broken instance ended with an explicit error within 15 s of the kill.
    assert max(ended[i] for i in failed) - killed < 15
    assert all(b"instance rank failure" in results[i][-2] for i in failed), [results[i][-2] for i in failed]
    assert unready - killed < 15  # /readyz of the broken instance failed (503, then gone)
    assert all(len(r) == 401 for r in (results[i] for i in completed))
    assert all(len(a) == 16 for a in after)  # new requests are served by the other decode instance
    assert launcher.returncode not in (None, 0)  # the instance left as a whole, saying it failed
    assert gone == {0: True, 1: True}
