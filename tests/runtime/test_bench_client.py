"""`disagg bench`: prompts, trace replay against a scripted OpenAI server, summaries, sweep goodput, outputs."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace

import numpy as np
import pytest
from aiohttp import web
from disagg_planner.workloads import SimRequest
from disagg_runtime.benchclient.client import RequestRecord, run_trace
from disagg_runtime.benchclient.prompts import make_prompt
from disagg_runtime.benchclient.report import max_rate_meeting, summarize
from disagg_runtime.benchclient.runner import BenchConfig, BenchError, parse_sweep, run_bench
from disagg_runtime.serve.runner import start_site


def test_prompts_have_the_requested_length():
    rng = np.random.default_rng(0)
    ids = make_prompt(37, "ids", rng)
    assert len(ids) == 37 and all(3 <= i < 259 for i in ids)
    assert len(make_prompt(12, "words", rng).split()) == 12
    with pytest.raises(ValueError, match="unknown prompt mode"):
        make_prompt(3, "bytes", rng)  # type: ignore[arg-type]


def test_parse_sweep():
    assert parse_sweep("1:4:4") == [1.0, 2.0, 3.0, 4.0]
    for bad in ("1:4", "0:4:2", "4:1:2", "a:b:c"):
        with pytest.raises(BenchError, match="--sweep"):
            parse_sweep(bad)


def rec(i, ttft, tpot, tokens=11, status=200) -> RequestRecord:
    r = RequestRecord(i, 10, tokens, scheduled=float(i), sent=float(i), status=status)
    if status == 200:
        r.first_token = r.sent + ttft
        r.last_token = r.first_token + tpot * (tokens - 1)
        r.tokens = tokens
    return r


def test_summary_counts_every_sent_request_in_attainment():
    records = [rec(0, 0.1, 0.01), rec(1, 0.1, 0.05), rec(2, 0.5, 0.01), rec(3, 0.1, 0.01), rec(4, 0, 0, status=429)]
    s = summarize(records, rate=1.0, ttft_slo=0.2, tpot_slo=0.02)
    assert (s.requests, s.ok, s.rejected, s.errors) == (5, 4, 1, 0)
    assert s.attainment == pytest.approx(2 / 5)
    assert s.ttft_attainment == pytest.approx(3 / 5) and s.tpot_attainment == pytest.approx(3 / 5)
    assert s.ttft_p50 == pytest.approx(0.1) and s.tpot_p50 == pytest.approx(0.01)
    assert s.goodput_rps == pytest.approx(2 / s.duration_s)


def test_sweep_goodput_interpolates_the_crossing():
    base = summarize([rec(0, 0.1, 0.01)], rate=1.0, ttft_slo=1, tpot_slo=1)

    def at(rate, attainment):
        return replace(base, rate=rate, attainment=attainment)

    assert max_rate_meeting([at(1, 1.0), at(2, 0.95), at(3, 0.85)], 0.9) == pytest.approx(2.5)
    assert max_rate_meeting([at(1, 0.5)], 0.9) is None
    assert max_rate_meeting([at(1, 0.99), at(4, 0.95)], 0.9) == 4  # a lower bound


class FakeOpenAI:
    """Streams `max_tokens` chunks, `gap` seconds apart, after `ttft` seconds; records what it received."""

    def __init__(self, ttft: float = 0.05, gap: float = 0.01) -> None:
        self.ttft, self.gap = ttft, gap
        self.bodies: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, _r):
        return web.json_response({"data": [{"id": "fake", "max_model_len": 300}]})

    async def complete(self, request):
        body = await request.json()
        self.bodies.append(body)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await asyncio.sleep(self.ttft)
        n = body["max_tokens"]
        for i in range(n):
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(self.gap)
        usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp


async def test_trace_replay_times_tokens_and_sends_exact_prompts():
    server = FakeOpenAI(ttft=0.05, gap=0.01)
    runner, port = await start_site(server.app(), "127.0.0.1", 0)
    try:
        trace = [SimRequest(0.0, 20, 6), SimRequest(0.1, 7, 3), SimRequest(0.15, 50, 1)]
        records = await run_trace(f"http://127.0.0.1:{port}", trace, model="fake")
    finally:
        await runner.cleanup()
    assert [len(b["prompt"]) for b in server.bodies] == [20, 7, 50]
    assert [b["max_tokens"] for b in server.bodies] == [6, 3, 1] and all(b["ignore_eos"] for b in server.bodies)
    assert all(r.ok for r in records)
    assert [r.tokens for r in records] == [6, 3, 1] and [r.reported_tokens for r in records] == [6, 3, 1]
    for r in records:
        assert r.sent >= r.scheduled - 0.005
        assert 0.04 < r.ttft < 1.0
    assert 0.008 < records[0].tpot < 0.2 and records[2].tpot == 0.0


def test_run_bench_writes_table_json_and_plot(tmp_path, capsys):
    async def serve():
        return await start_site(FakeOpenAI(ttft=0.01, gap=0.001).app(), "127.0.0.1", 0)

    loop = asyncio.new_event_loop()
    runner, port = loop.run_until_complete(serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        config = BenchConfig(url=f"http://127.0.0.1:{port}", workload="code", rates=[20.0, 40.0], num_requests=8,
                             ttft_slo=0.5, tpot_slo=0.1, out=tmp_path / "out")
        summaries, goodput = run_bench(config)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["rate"] for r in doc["runs"]] == [20.0, 40.0] and doc["max_context"] == 300
    assert all(len(v) == 8 for v in doc["requests"].values())
    # Lengths were clipped to the server's context (prompt + output <= 300).
    assert all(r["input_len"] + r["output_len"] <= 300 for v in doc["requests"].values() for r in v)
    assert (tmp_path / "out" / "bench.png").stat().st_size > 10_000
    assert all(s.attainment == 1.0 for s in summaries) and goodput == 40.0
    assert "disagg bench" in capsys.readouterr().out
