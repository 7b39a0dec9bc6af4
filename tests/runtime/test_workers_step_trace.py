"""The engine-step trace (`--step-trace DIR`): one line per step, with the sizes the latency model takes."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import pytest
from disagg_runtime.engine import Engine
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import RouterConfig
from disagg_runtime.serve.inprocess import InProcessDeployment
from disagg_runtime.serve.options import add_serve_arguments
from disagg_runtime.serve.roles import worker_config
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.colocated import ColocatedWorker
from disagg_runtime.workers.step_trace import StepTrace, read_steps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=9)


async def _complete(session, url: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["choices"][0]["token_ids"]


async def test_colocated_steps_are_traced_with_their_sizes(model_dir, tmp_path):
    prompts = [[5 + (7 * i + j) % 300 for j in range(4 + 9 * i)] for i in range(6)]
    max_tokens = 9
    config = WorkerConfig(prefill_token_budget=64, step_trace_dir=str(tmp_path / "steps"))
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=256), config)
    async with InProcessDeployment([], [], RouterConfig(prefill=[], decode=[]), colocated=[worker]) as dep, \
            aiohttp.ClientSession() as s:
        outs = await asyncio.gather(*(_complete(s, dep.url, p, max_tokens) for p in prompts))
    assert [len(o) for o in outs] == [max_tokens] * len(prompts)

    [path] = (tmp_path / "steps").glob("colocated-*.jsonl")
    steps = list(read_steps(path))
    prefills = [s for s in steps if s.kind == "prefill"]
    decodes = [s for s in steps if s.kind == "decode"]
    # Every prompt is prefilled once, in batches within the budget (one longer prompt may run alone).
    assert sum(s.batch for s in prefills) == len(prompts)
    assert sum(s.tokens for s in prefills) == sum(len(p) for p in prompts)
    assert sum(s.sum_sq for s in prefills) == sum(len(p) ** 2 for p in prompts)
    assert len(prefills) >= 2  # 193 prompt tokens cannot go in one 64-token batch
    # The first token comes from the prefill, the others from decode steps, one token per sequence each.
    assert sum(s.tokens for s in decodes) == len(prompts) * (max_tokens - 1)
    assert all(s.batch == s.tokens and s.context > 0 for s in decodes if s.batch)
    assert all(s.seconds > 0 for s in steps)
    starts = [s.start for s in steps]
    assert starts == sorted(starts)
    # What the Prometheus histogram counted is what the trace holds.
    count = worker.registry.get_sample_value("disagg_engine_step_seconds_count", {"role": "colocated"})
    assert count == len(steps)


def test_trace_files_are_per_process_and_a_torn_line_is_skipped(tmp_path):
    trace = StepTrace.in_dir(tmp_path, "decode")
    trace.record("decode", 0.0, 0.004, batch=3, tokens=3, context=300)
    trace.close()
    trace.record("decode", 0.0, 0.004, batch=1, tokens=1)  # after close: dropped, not an error
    with (tmp_path / "prefill-1.jsonl").open("w") as f:
        f.write('{"kind":"prefill","start":1.0,"seconds":0.02,"batch":1,"tokens":700,"sum_sq":490000,"context":0}\n')
        f.write('{"kind":"prefill","start":2.0,"sec')  # the worker was writing when the file was read
    steps = list(read_steps(tmp_path))
    assert sorted((s.kind, s.batch) for s in steps) == [("decode", 3), ("prefill", 1)]
    assert next(s for s in steps if s.kind == "decode").context == 300


def test_step_trace_flag_reaches_the_worker_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--role", "decode", "--model-path", str(tmp_path), "--step-trace", str(tmp_path / "t")])
    assert worker_config(args).step_trace_dir == str(tmp_path / "t")
    args = parser.parse_args(["--role", "decode", "--model-path", str(tmp_path)])
    assert worker_config(args).step_trace_dir is None
