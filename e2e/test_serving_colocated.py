"""The colocated baseline as processes on CPU (what `disagg serve --local --colocated` starts): router ->
colocated worker, no KV transfer. Correctness against one engine, the operator's endpoints file, the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster


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


async def complete(session, url, prompt, *, stream: bool) -> list[int]:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True, "stream": stream}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return (await resp.json())["choices"][0]["token_ids"]
        ids = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
        return ids


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
           "--endpoints-file", str(path)]
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
    cmd = [sys.executable, "-m", "disagg_cli.main", "serve", "--local", "--colocated", "--port", "0",
           "--cache-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1)[0]:
                line = proc.stdout.readline()
        assert "1 colocated" in line
        url = re.search(r"at (http://\S+)", line).group(1)
        body = json.dumps({"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            events = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
        assert len(events) == 9 and events[-1] == "data: [DONE]"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        proc.stdout.close()
    assert code == 0
    left = subprocess.run(["pgrep", "-f", f"model-path {tmp_path}"], capture_output=True, text=True).stdout
    assert left.strip() == ""
