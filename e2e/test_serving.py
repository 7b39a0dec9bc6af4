"""The serving path as processes on CPU (what `disagg serve --local` starts): router -> prefill -> TCP KV
channel -> decode, with a tiny random model. Correctness against one engine, failures, overload, limits."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

from .conftest import complete, processes_serving, serve_local, stream_hello


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("serving") / "tiny-llama", seed=11)


@pytest.fixture(scope="module")
def serving(model_dir):
    """Router + 1 prefill + 1 decode worker, as processes."""
    with LocalCluster(model_dir=model_dir, port=0, worker_args=["--device", "cpu", "--num-kv-blocks", "1024",
                                                                "--prefill-token-budget", "512"]) as cluster:
        yield cluster


def prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + 13 * j) % 500 for j in range(4 + (i * 37) % 90)] for i in range(n)]


async def test_32_concurrent_requests_equal_single_process_generation(serving, model_dir):
    ps = prompts(32)
    engine = Engine.load(model_dir, device="cpu", num_blocks=1024)
    want = engine.generate([GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(ps)])
    async with aiohttp.ClientSession() as s:
        got = await asyncio.wait_for(
            asyncio.gather(*(complete(s, serving.url, p, stream=i % 2 == 0) for i, p in enumerate(ps))), 120)
        decode_url = f"http://127.0.0.1:{serving.ports['decode-0']}"
        async with s.get(f"{decode_url}/metrics") as resp:
            metrics = await resp.text()
    assert got == [want[f"r{i}"] for i in range(32)]
    pulls = [line for line in metrics.splitlines()
             if line.startswith('disagg_kv_transfer_seconds_count{channel="tcp",role="decode"}')]
    assert pulls and float(pulls[0].split()[-1]) >= 32 - sum(len(w) == 1 for w in want.values())


async def test_ten_megabyte_prompt_is_refused_with_413(serving):
    async with aiohttp.ClientSession() as s:
        body = json.dumps({"prompt": "lorem " * ((10 << 20) // 6), "max_tokens": 4}).encode()
        async with s.post(f"{serving.url}/v1/completions", data=body) as resp:
            data = await resp.json()
        assert resp.status == 413 and data["error"]["type"] == "invalid_request_error"
        assert await complete(s, serving.url, [5, 6, 7], stream=False)  # and the router still serves
    assert all(p.poll() is None for p in serving.processes.values())


async def test_killing_a_decode_worker_ends_only_its_streams(model_dir):
    cluster = LocalCluster(model_dir=model_dir, port=0, decode_workers=2,
                           worker_args=["--device", "cpu", "--num-kv-blocks", "1024"],
                           router_args=["--heartbeat-timeout", "5"])
    with cluster:
        async with aiohttp.ClientSession() as s:
            started = [asyncio.Event() for _ in range(8)]

            async def stream(i: int) -> list:
                body = {"prompt": [5 + i, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
                events = []
                async with s.post(f"{cluster.url}/v1/completions", json=body) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            events.append(line[6:].strip())
                            if len(events) == 3:
                                started[i].set()
                return events

            tasks = [asyncio.create_task(stream(i)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            cluster.processes["decode-0"].send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            elapsed = time.monotonic() - t0
            after = await complete(s, cluster.url, [9, 9, 9], stream=True)
        alive = {n: p.poll() is None for n, p in cluster.processes.items()}
    failed = [r for r in results if b'"error"' in r[-2]]
    completed = [r for r in results if b'"finish_reason":"length"' in r[-2]]
    assert failed and completed and len(failed) + len(completed) == 8
    assert all(r[-1] == b"[DONE]" and len(r) < 402 for r in failed)
    assert all(len(r) == 401 for r in completed)  # 400 tokens + [DONE]
    assert elapsed < 30 and len(after) == 16
    assert alive == {"prefill-0": True, "decode-0": False, "decode-1": True, "router": True}


async def test_overload_gives_429_not_timeouts(model_dir):
    cluster = LocalCluster(model_dir=model_dir, port=0,
                           worker_args=["--device", "cpu", "--num-kv-blocks", "1024", "--max-queue", "2"])
    with cluster:
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> tuple[int, str | None]:
                body = {"prompt": [3 + i % 200] * 64, "max_tokens": 8}
                async with s.post(f"{cluster.url}/v1/completions", json=body) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("Retry-After")

            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(120))), 90)
            elapsed = time.monotonic() - t0
        alive = all(p.poll() is None for p in cluster.processes.values())
    statuses = [st for st, _ in results]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    assert all(retry is not None for st, retry in results if st == 429)
    assert alive and elapsed < 60


def test_disagg_serve_local_prints_a_url_that_streams_and_stops_cleanly(tmp_path):
    with serve_local([], tmp_path) as served:
        events = stream_hello(served.url)
        assert len(events) == 9 and events[-1] == "data: [DONE]"
        assert (tmp_path / "models" / "tiny-llama-v1" / "model.safetensors").is_file()
    assert served.code == 0
    # The launcher took its children with it.
    assert processes_serving(tmp_path).strip() == ""
