"""Colocated worker with the real engine on a tiny random model: output, scheduling, overload, drain, abort."""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import RouterConfig
from disagg_runtime.serve.inprocess import InProcessDeployment
from disagg_runtime.serve.options import ServeError, add_serve_arguments, check_serve_arguments
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.colocated import ColocatedWorker
from disagg_runtime.workers.protocol import PrefillRequest, SamplingSpec
from disagg_runtime.workers.relay import TokenLog
from disagg_runtime.workers.step_trace import read_steps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=5)


def reference(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = Engine.load(model_dir, num_blocks=512)
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    return [out[f"r{i}"] for i in range(len(prompts))]


def prompts(n: int) -> list[list[int]]:
    return [[3 + (11 * i + 7 * j) % 400 for j in range(3 + (i * 29) % 70)] for i in range(n)]


def deployment(model_dir, *, blocks=512, config: WorkerConfig | None = None) -> InProcessDeployment:
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=blocks), config or WorkerConfig())
    return InProcessDeployment([], [], RouterConfig(prefill=[], decode=[]), colocated=[worker])


async def complete(session, url, prompt, max_tokens, *, stream=False, **extra) -> tuple[int, dict | list]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "stream": stream, **extra}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if not stream or resp.status != 200:
            return resp.status, await resp.json()
        ids = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
        return resp.status, ids


async def test_greedy_output_through_the_router_equals_engine_generate(model_dir):
    ps = prompts(10)
    want = reference(model_dir, ps, max_tokens=12)
    async with deployment(model_dir, config=WorkerConfig(prefill_token_budget=96)) as dep, \
            aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(complete(s, dep.url, p, 12, stream=i % 2 == 1) for i, p in enumerate(ps)))
        async with s.get(f"{dep.url}/readyz") as resp:
            ready = resp.status, await resp.json()
        worker = dep.colocated[0]
        stats = worker.stats()
    ids = [g if isinstance(g, list) else g["choices"][0]["token_ids"] for _, g in got]
    assert [status for status, _ in got] == [200] * len(ps)
    assert ids == want
    assert [g["usage"]["prompt_tokens"] for i, (_, g) in enumerate(got) if i % 2 == 0] == \
        [len(p) for p in ps[::2]]
    assert ready == (200, {"prefill": 0, "decode": 0, "colocated": 1, "draining": False})
    assert stats.role == "colocated" and stats.running == 0 and stats.queue_depth == 0
    assert stats.free_blocks == stats.total_blocks and stats.kv_port is None
    # Prefill batches (a 96-token budget cannot take every prompt at once) and decode steps both counted.
    steps = worker.registry.get_sample_value("disagg_engine_step_seconds_count", {"role": "colocated"})
    assert steps >= 2 + 11


def _worker(model_dir, *, blocks: int, budget: int) -> ColocatedWorker:
    return ColocatedWorker(Engine.load(model_dir, num_blocks=blocks, block_size=16),
                           WorkerConfig(prefill_token_budget=budget))


def _submit(worker: ColocatedWorker, rid: str, length: int, max_tokens: int) -> None:
    msg = PrefillRequest(request_id=rid, prompt_ids=[5] * length,
                         sampling=SamplingSpec(max_tokens=max_tokens, ignore_eos=True))
    assert worker._enqueue(worker._job(msg, list(msg.prompt_ids), TokenLog()))


async def test_steps_follow_the_simulators_prefill_first_schedule(model_dir):
    # Driven step by step on this thread (the engine thread is not started): every step is either a
    # prefill batch of the FCFS prefix under the token budget, or one decode step for all running.
    worker = _worker(model_dir, blocks=512, budget=64)
    worker.loop = asyncio.get_running_loop()
    for rid in ("a", "b", "c"):
        _submit(worker, rid, 30, 4)
    engine = worker.engine
    assert worker._step() and engine.num_running == 2  # a + b = 60 tokens; c would pass the budget
    assert worker._step() and engine.num_running == 3  # c waits and fits: prefill before any decode
    before = {rid: len(engine._seqs[rid].output_ids) for rid in "abc"}
    assert worker._step()  # nothing waits: one decode step, one token each
    assert {rid: len(engine._seqs[rid].output_ids) for rid in "abc"} == {rid: n + 1 for rid, n in before.items()}
    await asyncio.sleep(0)  # deliver the dispatched tokens
    assert all(worker.jobs[rid].state == "running" for rid in "abc")


async def test_requests_are_admitted_by_their_prompt_and_preempted_ones_resume(model_dir):
    # 6 blocks of 16 tokens, watermark 1 block. A 30-token prompt takes 2 blocks, its whole life (49 tokens)
    # 4: two are admitted at once (a whole-life reservation would admit one), the third waits.
    worker = _worker(model_dir, blocks=6, budget=4096)
    worker.loop = asyncio.get_running_loop()
    for rid in ("first", "second", "third"):
        _submit(worker, rid, 30, 20)
    assert worker._step() and worker.engine.num_running == 2
    assert worker._load() == (1, 30, 2)
    steps = 0
    while worker.jobs and steps < 200:
        worker._step()
        steps += 1
        await asyncio.sleep(0)  # deliver the dispatched tokens
    assert not worker.jobs and worker.engine.free_blocks == 6
    # At 48 cached tokens both want a 4th block and one is free: "second" (latest admitted) was preempted.
    assert worker.engine.preemption_stats.preemptions >= 1
    text = worker.registry.get_sample_value("disagg_preemptions_total", {"role": "colocated"})
    assert text == worker.engine.preemption_stats.preemptions


async def test_overload_gives_429_with_retry_after(model_dir):
    config = WorkerConfig(max_queue=2, max_batch=2)
    async with deployment(model_dir, config=config) as dep, aiohttp.ClientSession() as s:
        results = await asyncio.wait_for(
            asyncio.gather(*(complete(s, dep.url, [3 + i] * 48, 16, ignore_eos=True) for i in range(40))), 60)
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429}
    refused = [body for status, body in results if status == 429]
    assert all(body["error"]["type"] == "rate_limit_error" for body in refused)


async def test_drain_finishes_in_flight_work_then_refuses_new(model_dir):
    async with deployment(model_dir) as dep, aiohttp.ClientSession() as s:
        worker = dep.colocated[0]
        url = dep.worker_urls[id(worker)]
        inflight = asyncio.create_task(complete(s, dep.url, "drain me", 120, ignore_eos=True))
        while not worker.jobs:
            await asyncio.sleep(0.001)
        async with s.post(f"{url}/drain") as resp:
            assert (await resp.json())["draining"] is True
        async with s.get(f"{url}/readyz") as resp:
            assert resp.status == 503
        status, done = await inflight
        assert status == 200 and len(done["choices"][0]["token_ids"]) == 120
        await asyncio.wait_for(worker.drained.wait(), 5)
        async with s.post(f"{url}/generate", json={"request_id": "late", "prompt": "hi"}) as resp:
            assert resp.status == 503


async def test_client_disconnect_aborts_and_frees_kv(model_dir):
    async with deployment(model_dir) as dep, aiohttp.ClientSession() as s:
        worker = dep.colocated[0]
        body = {"prompt": "the quick brown fox", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            for _ in range(3):
                await resp.content.readline()
        for _ in range(200):
            if not worker.jobs and worker.engine.free_blocks == worker.engine.total_blocks:
                break
            await asyncio.sleep(0.02)
        assert not worker.jobs and worker.engine.free_blocks == worker.engine.total_blocks


async def test_worker_rejects_what_the_model_cannot_take(model_dir):
    async with deployment(model_dir, config=WorkerConfig(max_prompt_tokens=50)) as dep, \
            aiohttp.ClientSession() as s:
        for body, message in [({"prompt": list(range(3, 60)), "max_tokens": 4}, "at most 50"),
                              ({"prompt": [3, 4], "max_tokens": 600}, "exceeds the model context")]:
            async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
                data = await resp.json()
            assert resp.status == 400 and message in data["error"]["message"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_flags_for_the_colocated_role(monkeypatch):
    for var in ("DISAGG_MODEL_SPEC", "DISAGG_ENDPOINTS"):
        monkeypatch.delenv(var, raising=False)
    check_serve_arguments(_parse("--role", "colocated", "--model-path", "/m", "--port", "8000"))
    check_serve_arguments(_parse("--role", "router", "--colocated-endpoints", "a:1,b:2"))
    check_serve_arguments(_parse("--local", "--colocated", "--colocated-workers", "2"))
    with pytest.raises(ServeError, match="needs --model-path"):
        check_serve_arguments(_parse("--role", "colocated"))
    with pytest.raises(ServeError, match="goes with --local"):
        check_serve_arguments(_parse("--role", "colocated", "--model-path", "/m", "--colocated"))


async def test_an_overlapped_engine_streams_the_same_tokens_with_prefills_between_its_steps(model_dir, tmp_path):
    # Prompts arrive while others decode, so prefills run with a decode step in flight, whose tokens the
    # worker streams during the prefill (Engine.prefill's on_decoded) rather than after it.
    ps = prompts(8)
    want = reference(model_dir, ps, max_tokens=20)
    engine = Engine.load(model_dir, num_blocks=512, overlap_decode=True)
    worker = ColocatedWorker(engine, WorkerConfig(prefill_token_budget=96, step_trace_dir=str(tmp_path)))
    async with InProcessDeployment([], [], RouterConfig(prefill=[], decode=[]), colocated=[worker]) as dep, \
            aiohttp.ClientSession() as s:
        async def later(i: int, p: list[int]):
            await asyncio.sleep(0.03 * i)
            return await complete(s, dep.url, p, 20, stream=True, ignore_eos=False)

        got = await asyncio.gather(*(later(i, p) for i, p in enumerate(ps)))
    assert [status for status, _ in got] == [200] * len(ps)
    assert [ids for _, ids in got] == want
    assert engine.free_blocks == engine.total_blocks
    kinds = [st.kind for st in sorted(read_steps(tmp_path), key=lambda st: st.start)]
    assert any(a == "decode" and b == "prefill" for a, b in zip(kinds[:-1], kinds[1:], strict=True))  # a prefill mid-decode
