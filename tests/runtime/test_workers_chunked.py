"""Colocated worker with chunked prefill: mixed steps under the token budget, same greedy output, abort, flags."""

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
from disagg_runtime.serve.options import add_serve_arguments
from disagg_runtime.serve.roles import worker_config
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.colocated import ColocatedWorker
from disagg_runtime.workers.protocol import PrefillRequest, SamplingSpec
from disagg_runtime.workers.relay import TokenLog

CHUNKED = dict(colocated_prefill="chunked")


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


async def complete(session, url, prompt, max_tokens, *, stream=False) -> tuple[int, dict | list]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, "stream": stream}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if not stream or resp.status != 200:
            return resp.status, await resp.json()
        ids = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
        return resp.status, ids


def _worker(model_dir, *, blocks: int = 512, budget: int = 32, **kw) -> ColocatedWorker:
    return ColocatedWorker(Engine.load(model_dir, num_blocks=blocks, block_size=16),
                           WorkerConfig(chunk_token_budget=budget, **CHUNKED, **kw))


def _submit(worker: ColocatedWorker, rid: str, length: int, max_tokens: int) -> None:
    msg = PrefillRequest(request_id=rid, prompt_ids=[5 + len(rid)] * length,
                         sampling=SamplingSpec(max_tokens=max_tokens, ignore_eos=True))
    assert worker._enqueue(worker._job(msg, list(msg.prompt_ids), TokenLog()))


async def test_greedy_output_with_chunked_prefill_equals_engine_generate(model_dir):
    ps = prompts(10)
    want = reference(model_dir, ps, max_tokens=12)
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=512), WorkerConfig(chunk_token_budget=24, **CHUNKED))
    dep = InProcessDeployment([], [], RouterConfig(prefill=[], decode=[]), colocated=[worker])
    async with dep, aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(complete(s, dep.url, p, 12, stream=i % 2 == 1) for i, p in enumerate(ps)))
    ids = [g if isinstance(g, list) else g["choices"][0]["token_ids"] for _, g in got]
    assert [status for status, _ in got] == [200] * len(ps)
    assert ids == want
    assert worker.engine.free_blocks == worker.engine.total_blocks


async def test_each_step_carries_the_decodes_and_prompt_chunks_within_the_budget(model_dir):
    # Driven step by step on this thread (the engine thread is not started).
    worker = _worker(model_dir, budget=32)
    worker.loop = asyncio.get_running_loop()
    engine = worker.engine
    _submit(worker, "a", 50, 6)
    assert worker._step()  # a: 32 of its 50 prompt tokens, no token yet
    assert engine._seqs["a"].num_cached == 32 and not engine._seqs["a"].output_ids
    _submit(worker, "b", 20, 6)
    assert worker._step()  # a's last 18, then b's first 14 (32 in all)
    assert engine._seqs["a"].num_cached == 50 and len(engine._seqs["a"].output_ids) == 1
    assert engine._seqs["b"].num_cached == 14
    assert worker._step()  # a decodes (1 token), b's last 6: the step does not wait for b's whole prompt
    assert len(engine._seqs["a"].output_ids) == 2 and len(engine._seqs["b"].output_ids) == 1
    assert worker._step()  # both decode
    assert len(engine._seqs["a"].output_ids) == 3 and len(engine._seqs["b"].output_ids) == 2
    await asyncio.sleep(0)
    assert worker.jobs["a"].state == "running"


async def test_prompts_are_admitted_on_their_prompt_blocks_and_decode_growth_preempts(model_dir):
    # Each prompt needs 2 blocks (30 tokens), each whole life 4 (30 + 20 - 1): both prompts fit 6 blocks
    # with the watermark to spare, both lives do not, so decoding them together must preempt one.
    worker = _worker(model_dir, blocks=6, budget=64)
    worker.loop = asyncio.get_running_loop()
    _submit(worker, "first", 30, 20)
    _submit(worker, "second", 30, 20)
    engine = worker.engine
    assert worker._step() and sorted(engine.request_ids) == ["first", "second"]
    for _ in range(200):
        if not engine.num_running:
            break
        assert worker._step()  # also while everything left is preempted: the step resumes it
    assert not engine.num_running
    engine.decode()  # releases the finished
    assert engine.preemption_stats.preemptions > 0
    assert engine.free_blocks == engine.total_blocks


async def test_aborting_a_prompt_mid_chunks_frees_its_kv(model_dir):
    worker = _worker(model_dir, budget=16)
    worker.loop = asyncio.get_running_loop()
    _submit(worker, "long", 60, 4)
    assert worker._step()
    worker.engine.abort("long")  # what abort() submits to the engine thread
    assert not worker._step()  # nothing left to run, and the stepper forgot the request
    assert worker.engine.free_blocks == worker.engine.total_blocks


def test_serve_flags_choose_the_scheduler():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--role", "colocated", "--model-path", "/m", "--colocated-prefill", "chunked",
                              "--chunk-token-budget", "256"])
    cfg = worker_config(args)
    assert cfg.colocated_prefill == "chunked" and cfg.chunk_token_budget == 256
    assert worker_config(parser.parse_args(["--role", "colocated", "--model-path", "/m"])).colocated_prefill == \
        "priority"
