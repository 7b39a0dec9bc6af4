"""Instance choice: shortest prefill queue, most free decode KV, capacity limits, DNS endpoints."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web
from disagg_runtime.router.pool import NoCapacity, NoWorkers, Worker, WorkerPool
from disagg_runtime.router.resolve import EndpointResolver
from disagg_runtime.workers.protocol import WorkerStats


def stats(role, *, queue=0, tokens=0, free=100, max_queue=4, ready=True) -> WorkerStats:
    return WorkerStats(role=role, model_id="m", ready=ready, draining=False, queue_depth=queue,
                       queued_tokens=tokens, max_queue=max_queue, running=0, free_blocks=free, total_blocks=100,
                       block_size=16, max_context=2048)


async def pool_of(*workers: Worker) -> WorkerPool:
    async with aiohttp.ClientSession() as session:
        pool = WorkerPool(session, prefill=[], decode=[])
    for w in workers:
        w.healthy = True
        pool.workers[w.url] = w
    return pool


async def test_prefill_goes_to_the_shortest_queue_then_fewest_tokens():
    a = Worker("prefill", "http://a:1", stats("prefill", queue=2, tokens=10))
    b = Worker("prefill", "http://b:1", stats("prefill", queue=1, tokens=900))
    c = Worker("prefill", "http://c:1", stats("prefill", queue=1, tokens=50))
    pool = await pool_of(a, b, c)
    assert pool.pick_prefill() is c
    # c now has one dispatched request on top of its polled queue: b (fewer tokens than a) is next.
    assert pool.pick_prefill() is b
    assert {pool.pick_prefill().url for _ in range(3)} <= {"http://a:1", "http://b:1", "http://c:1"}


async def test_decode_goes_to_the_most_free_kv_and_counts_what_it_sent():
    a = Worker("decode", "http://a:1", stats("decode", free=100))
    b = Worker("decode", "http://b:1", stats("decode", free=80))
    pool = await pool_of(a, b)
    assert pool.pick_decode(tokens=16 * 30) is a  # a: 100 - 30 = 70 free after this
    assert pool.pick_decode(tokens=16) is b
    assert pool.pick_decode(tokens=16, exclude={"http://b:1"}) is a


async def test_full_or_missing_instances():
    full = Worker("prefill", "http://a:1", stats("prefill", queue=4, max_queue=4))
    not_ready = Worker("decode", "http://b:1", stats("decode", ready=False))
    pool = await pool_of(full, not_ready)
    with pytest.raises(NoCapacity, match="all prefill instances are at their queue limit"):
        pool.pick_prefill()
    with pytest.raises(NoWorkers, match="no decode instance is ready"):
        pool.pick_decode(tokens=1)


async def test_dns_endpoints_resolve_to_every_address_and_unreachable_ones_are_unhealthy():
    async with aiohttp.ClientSession() as session:
        pool = WorkerPool(session, prefill=["localhost:9"], decode=["127.0.0.1:9"], poll_timeout_s=0.5)
        await pool.refresh()
    urls = sorted(pool.workers)
    assert "http://127.0.0.1:9" in urls and all(u.endswith(":9") for u in urls)
    assert not any(w.healthy for w in pool.workers.values())


def test_endpoints_must_be_host_port():
    with pytest.raises(ValueError, match="must be host:port"):
        WorkerPool(None, prefill=["nohost"], decode=[])  # type: ignore[arg-type]


async def test_endpoints_file_is_reread_so_replans_reach_the_router(tmp_path):
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps({"prefill": ["http://127.0.0.1:9/"], "decode": []}))
    async with aiohttp.ClientSession() as session:
        pool = WorkerPool(session, prefill=[], decode=["127.0.0.1:8"], endpoints_file=str(path), poll_timeout_s=0.3)
        await pool.refresh()
        assert sorted(pool.workers) == ["http://127.0.0.1:8", "http://127.0.0.1:9"]
        path.write_text(json.dumps({"prefill": ["127.0.0.1:10"], "decode": ["http://127.0.0.1:11"]}))
        await pool.refresh()
        assert sorted(pool.workers) == ["http://127.0.0.1:10", "http://127.0.0.1:11", "http://127.0.0.1:8"]
        path.write_text("{broken")
        await pool.refresh()  # a half-written file keeps the last good list
        assert sorted(pool.workers) == ["http://127.0.0.1:10", "http://127.0.0.1:11", "http://127.0.0.1:8"]
    assert {w.role for w in pool.workers.values() if w.url.endswith(":11")} == {"decode"}


async def test_a_slow_name_lookup_delays_no_poll_and_counts_once_it_finishes():
    """A rollout lists pods before they exist; their names may take a resolver's whole timeout to fail."""
    started: list[str] = []
    answer = asyncio.Event()

    async def lookup(host: str, port: int) -> list[str]:
        started.append(host)
        await answer.wait()  # a nameserver that does not answer until told
        return ["127.0.0.2"]

    async def stats_handler(request):
        role = "decode" if request.url.port == ports[0] else "prefill"
        return web.Response(body=stats(role).model_dump_json(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/stats", stats_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sites = [web.TCPSite(runner, host, 0) for host in ("127.0.0.1", "127.0.0.2")]
    for site in sites:
        await site.start()
    ports = [site._server.sockets[0].getsockname()[1] for site in sites]
    try:
        async with aiohttp.ClientSession() as session:
            pool = WorkerPool(session, prefill=[f"new-pod-0.new-pods:{ports[1]}"], decode=[f"127.0.0.1:{ports[0]}"],
                              resolver=EndpointResolver(wait_s=0.2, lookup=lookup))
            for _ in range(3):
                t = time.monotonic()
                await pool.refresh()
                assert time.monotonic() - t < 2.0
                assert pool.ready("decode"), "the worker with an address was not polled"
                assert not pool.ready("prefill")
            assert started == ["new-pod-0.new-pods"], "a second lookup started while the first was running"
            answer.set()
            await pool.refresh()
            assert [w.url for w in pool.ready("prefill")] == [f"http://127.0.0.2:{ports[1]}"]
            await pool.close()
    finally:
        await runner.cleanup()
