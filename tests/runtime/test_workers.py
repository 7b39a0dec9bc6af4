"""Prefill and decode workers with the real engine on a tiny random model, behind the router, in-process."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import RouterConfig
from disagg_runtime.serve.inprocess import InProcessDeployment
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.decode import DecodeWorker
from disagg_runtime.workers.prefill import PrefillWorker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=3)


def reference(model_dir, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
    engine = Engine.load(model_dir, num_blocks=512)
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
            for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    return [out[f"r{i}"] for i in range(len(prompts))]


def prompts_of(model_dir, n: int) -> list[list[int]]:
    tok = Engine.load(model_dir, num_blocks=8).tokenizer
    words = "the planner measures how long each step takes and fits a small latency model".split()
    return [tok.encode(" ".join(words[: 2 + (i * 5) % len(words)]) * (1 + i % 3)) for i in range(n)]


async def complete(session, url, prompt, max_tokens, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, **extra}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return data


def deployment(model_dir, *, prefill_blocks=512, decode_blocks=512, config: WorkerConfig | None = None,
               **router) -> InProcessDeployment:
    config = config or WorkerConfig()
    p = PrefillWorker(Engine.load(model_dir, num_blocks=prefill_blocks), config)
    d = DecodeWorker(Engine.load(model_dir, num_blocks=decode_blocks), config)
    return InProcessDeployment([p], [d], RouterConfig(prefill=[], decode=[], **router))


async def test_disaggregated_greedy_output_equals_single_engine(model_dir):
    prompts = prompts_of(model_dir, 8)
    want = reference(model_dir, prompts, max_tokens=12)
    async with deployment(model_dir, config=WorkerConfig(prefill_token_budget=64)) as dep, \
            aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(complete(s, dep.url, p, 12) for p in prompts))
        p_worker, d_worker = dep.prefill[0], dep.decode[0]
        stats = p_worker.stats(), d_worker.stats()
    assert [g["choices"][0]["token_ids"] for g in got] == want
    assert [g["usage"]["prompt_tokens"] for g in got] == [len(p) for p in prompts]
    # Everything pulled and freed: nothing parked on prefill, no KV held on decode.
    assert stats[0].running == 0 and stats[0].free_blocks == stats[0].total_blocks
    assert stats[1].free_blocks == stats[1].total_blocks
    # Several batches ran (a 64-token budget cannot take all 8 prompts at once), and KV moved over TCP.
    samples = {m.name: m for m in p_worker.registry.collect()}
    steps = next(s.value for s in samples["disagg_engine_step_seconds"].samples if s.name.endswith("_count"))
    assert steps >= 2
    moved = next(s.value for s in samples["disagg_kv_transfer_bytes"].samples if s.name.endswith("_total"))
    assert moved > 0


async def test_decode_pulls_only_when_it_has_room(model_dir):
    # Each request needs ceil((prompt + 40 - 1) / 16) blocks; 8 blocks fit about two at a time.
    prompts = prompts_of(model_dir, 6)
    want = reference(model_dir, prompts, max_tokens=40, ignore_eos=True)
    async with deployment(model_dir, decode_blocks=8) as dep, aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(complete(s, dep.url, p, 40, ignore_eos=True)) for p in prompts]
        parked_seen = 0
        while not all(t.done() for t in tasks):
            parked_seen = max(parked_seen, dep.prefill[0].stats().running)
            await asyncio.sleep(0.001)
        got = [t.result()["choices"][0]["token_ids"] for t in tasks]
    assert got == want
    # KV waited on the prefill side while decode was full, instead of overrunning decode memory.
    assert parked_seen >= 2


async def test_client_disconnect_aborts_downstream_and_frees_kv(model_dir):
    async with deployment(model_dir) as dep, aiohttp.ClientSession() as s:
        decode = dep.decode[0]
        body = {"prompt": "the quick brown fox", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            for _ in range(3):
                await resp.content.readline()
        # The connection is closed here, mid-stream.
        for _ in range(200):
            if decode.engine.free_blocks == decode.engine.total_blocks and not decode.jobs:
                break
            await asyncio.sleep(0.02)
        assert not decode.jobs
        assert decode.engine.free_blocks == decode.engine.total_blocks
        samples = {m.name: m for m in dep.router.registry.collect()}["disagg_requests"].samples
        assert any(x.labels.get("outcome") == "aborted" and x.value == 1 for x in samples)


async def test_drain_finishes_in_flight_work_then_refuses_new(model_dir):
    async with deployment(model_dir) as dep, aiohttp.ClientSession() as s:
        p_url, d_url = dep.worker_urls[id(dep.prefill[0])], dep.worker_urls[id(dep.decode[0])]
        inflight = asyncio.create_task(complete(s, dep.url, "drain me", 200, ignore_eos=True))
        while not dep.decode[0].jobs:
            await asyncio.sleep(0.001)
        async with s.post(f"{d_url}/drain") as resp:
            assert (await resp.json())["draining"] is True
        async with s.get(f"{d_url}/readyz") as resp:
            assert resp.status == 503
        done = await inflight
        assert len(done["choices"][0]["token_ids"]) == 200
        await asyncio.wait_for(dep.decode[0].drained.wait(), 5)
        body = {"request_id": "x", "prompt_ids": [5, 6], "sampling": {}, "first_token_id": 1,
                "kv": {"host": "127.0.0.1", "port": 1}}
        async with s.post(f"{d_url}/decode", json=body) as resp:
            assert resp.status == 503
        dep.prefill[0].start_drain()
        await asyncio.wait_for(dep.prefill[0].drained.wait(), 5)
        async with s.post(f"{p_url}/prefill", json={"request_id": "y", "prompt": "hi"}) as resp:
            assert resp.status == 503


async def test_unpulled_kv_expires(model_dir):
    config = WorkerConfig(kv_ttl_s=0.2)
    worker = PrefillWorker(Engine.load(model_dir, num_blocks=64), config)
    dep = InProcessDeployment([worker], [DecodeWorker(Engine.load(model_dir, num_blocks=64), config)])
    async with dep, aiohttp.ClientSession() as s:
        url = dep.worker_urls[id(worker)]
        async with s.post(f"{url}/prefill", json={"request_id": "orphan", "prompt": "hello there",
                                                  "sampling": {"max_tokens": 8}}) as resp:
            lines = [json.loads(line) for line in (await resp.read()).splitlines()]
        assert lines[-1]["type"] == "prefilled" and "orphan" in worker.parked
        assert worker.engine.free_blocks < worker.engine.total_blocks
        for _ in range(100):
            if not worker.parked and worker.engine.free_blocks == worker.engine.total_blocks:
                break
            await asyncio.sleep(0.02)
        assert not worker.parked and worker.engine.free_blocks == worker.engine.total_blocks


async def test_prefill_rejects_what_the_model_cannot_take(model_dir):
    async with deployment(model_dir, config=WorkerConfig(max_prompt_tokens=50)) as dep, \
            aiohttp.ClientSession() as s:
        cases = [
            ({"prompt": list(range(3, 60)), "max_tokens": 4}, "at most 50"),
            ({"prompt": [3, 4], "max_tokens": 600}, "exceeds the model context"),
            ({"prompt": [3, 99999], "max_tokens": 4}, "token ids must be in"),
        ]
        for body, message in cases:
            async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
                data = await resp.json()
                assert resp.status == 400, data
                assert message in data["error"]["message"]
                assert data["error"]["type"] == "invalid_request_error"
