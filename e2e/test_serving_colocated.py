"""The colocated baseline as processes on CPU (what `disagg serve --local --colocated` starts): router ->
colocated worker, no KV transfer. Correctness against one engine, the operator's endpoints file, the CLI."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import subprocess
import sys

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

from .conftest import complete, processes_serving, serve_local, stream_hello


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("colocated") / "tiny-llama", seed=13)


@pytest.fixture(scope="module")
def serving(model_dir):
    """Router + 1 colocated worker, as processes."""
    with LocalCluster(model_dir=model_dir, port=0, colocated_workers=1,
                      worker_args=["--device", "cpu", "--num-kv-blocks", "1024",
                                   "--prefill-token-budget", "256"]) as cluster:
        yield cluster


def prompts(n: int) -> list[list[int]]:
    return [[3 + (5 * i + 17 * j) % 450 for j in range(5 + (i * 41) % 80)] for i in range(n)]


async def test_24_concurrent_requests_equal_single_process_generation(serving, model_dir):
    ps = prompts(24)
    engine = Engine.load(model_dir, device="cpu", num_blocks=1024)
    want = engine.generate([GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(ps)])
    async with aiohttp.ClientSession() as s:
        got = await asyncio.wait_for(
            asyncio.gather(*(complete(s, serving.url, p, stream=i % 2 == 0) for i, p in enumerate(ps))), 120)
        async with s.get(f"http://127.0.0.1:{serving.ports['colocated-0']}/metrics") as resp:
            metrics = await resp.text()
    assert got == [want[f"r{i}"] for i in range(24)]
    steps = [line for line in metrics.splitlines()
             if line.startswith('disagg_engine_step_seconds_count{role="colocated"}')]
    assert steps and float(steps[0].split()[-1]) >= 16  # prefill batches and 15 decode steps at least
    assert "disagg_kv_transfer_bytes_total{" not in metrics  # nothing moved: no KV channel at all
    assert set(serving.processes) == {"colocated-0", "router"}


async def test_router_serves_colocated_instances_from_the_operators_endpoints_file(serving, tmp_path):
    # What the operator renders for a colocated plan: endpoints.json with a "colocated" list, read by
    # `--role router --endpoints-file`.
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps({"colocated": [f"http://127.0.0.1:{serving.ports['colocated-0']}"]}))
    cmd = [sys.executable, "-m", "disagg_runtime.serve", "--role", "router", "--host", "127.0.0.1", "--port", "0",
           "--endpoints-file", str(path), "--internal-token-file", serving.token_file]
    router = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([router.stdout], [], [], 60)[0], "the router did not announce its port"
        url = f"http://127.0.0.1:{json.loads(router.stdout.readline())['port']}"
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(f"{url}/readyz") as resp:
                    ready = resp.status, await resp.json()
                if ready[0] == 200:
                    break
                await asyncio.sleep(0.1)
            assert ready == (200, {"prefill": 0, "decode": 0, "colocated": 1, "draining": False})
            assert len(await complete(s, url, [7, 8, 9], stream=True)) == 16
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(30)
        router.stdout.close()


def test_disagg_serve_local_colocated_prints_a_url_that_streams_and_stops_cleanly(tmp_path):
    with serve_local(["--colocated"], tmp_path) as served:
        assert "1 colocated" in served.line
        events = stream_hello(served.url)
        assert len(events) == 9 and events[-1] == "data: [DONE]"
    assert served.code == 0
    assert processes_serving(tmp_path).strip() == ""
