"""KV on demand through HTTP: `disagg serve --local --num-kv-blocks 64 --block-size 16` (router -> prefill ->
decode processes on CPU) with 8 concurrent 16-token prompts, max_tokens 300 and ignore_eos.

A whole-life reservation (16 + 299 tokens = 20 blocks) would let 3 decode at a time; on demand, all 8
start decoding, the cache fills (8 x 20 blocks > 64), the decode worker preempts, and every request still
ends with the tokens and text it produces alone."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

N, PROMPT, MAX_TOKENS = 8, 16, 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("preemption") / "tiny-llama", seed=11)


def _prompt(i: int) -> list[int]:
    return [5 + (31 * i + 7 * j) % 400 for j in range(PROMPT)]


async def _stream(session, url: str, i: int, log: list[tuple[int, int]]) -> tuple[list[int], str]:
    """Stream request i; append (request, tokens so far) to `log` at every chunk, in arrival order."""
    body = {"prompt": _prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": True}
    ids: list[int] = []
    text = ""
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                ids += choice["token_ids"]
                text += choice["text"]
                log.append((i, len(ids)))
    return ids, text


def _solo(model_dir, i: int) -> tuple[list[int], str]:
    """Request i alone on an engine of the same cache: its token ids and streamed text."""
    engine = Engine.load(model_dir, device="cpu", num_blocks=64, block_size=16)
    req = GenerationRequest(f"r{i}", _prompt(i), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    outputs = engine.prefill([req])
    while engine.num_running:
        outputs += engine.decode()
    return [o.token_id for o in outputs], "".join(o.text for o in outputs)


def _metric(text: str, name: str, role: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{role="{role}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


async def test_eight_requests_decode_at_once_preempt_and_match_their_solo_runs(model_dir):
    alone = {i: _solo(model_dir, i) for i in range(N)}
    args = ["--device", "cpu", "--num-kv-blocks", "64", "--block-size", "16"]
    with LocalCluster(model_dir=model_dir, port=0, worker_args=args) as cluster:
        log: list[tuple[int, int]] = []
        async with aiohttp.ClientSession() as s:
            got = await asyncio.wait_for(asyncio.gather(*(_stream(s, cluster.url, i, log) for i in range(N))), 300)
            async with s.get(f"http://127.0.0.1:{cluster.ports['decode-0']}/metrics") as resp:
                metrics = await resp.text()
    # When the first request finished, every other one had been decoding (more than its prefill token).
    first_done = next(k for k, (_, n) in enumerate(log) if n == MAX_TOKENS)
    progress = {i: 0 for i in range(N)}
    for i, n in log[:first_done]:
        progress[i] = n
    assert all(n > 1 for i, n in progress.items() if i != log[first_done][0]), progress
    assert _metric(metrics, "disagg_preemptions_total", "decode") > 0
    assert _metric(metrics, "disagg_preemption_swapped_tokens_total", "decode") > 0
    assert {i: got[i] for i in range(N)} == alone
