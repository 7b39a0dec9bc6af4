"""The router against scripted fake workers: OpenAI formats, limits, admission control, failures."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from disagg_runtime.router.app import Router, RouterConfig
from disagg_runtime.serve.runner import start_site

DIE, SILENT, BIG = 666, 777, 555  # first prompt token id that makes the fake decode misbehave (or talk a lot)


@dataclass
class FakeWorker:
    """Speaks the worker protocol (relay streams included); the prompt's first token id picks the decode
    behaviour."""

    role: str
    queue_depth: int = 0
    max_queue: int = 8
    free_blocks: int = 1000
    ready: bool = True
    prefill_status: int = 200
    tokens: int = 5
    big_text_bytes: int = 65536  # a BIG request's tokens each carry this much text
    refuse_decode: bool = False  # drop every /decode connection as it arrives (a dying process)
    prefill_calls: int = 0
    decode_calls: int = 0
    decoded: list[str] = field(default_factory=list)  # request ids /decode took
    aborts: list[str] = field(default_factory=list)
    url: str = ""
    relays: dict = field(default_factory=dict)  # relay id -> (request, response) of open relay streams
    silent: bool = False
    _tasks: set = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/prefill", self.prefill)
        app.router.add_post("/decode", self.decode)
        app.router.add_get("/relay", self.relay)
        app.router.add_post("/abort", self.abort)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, _app):
        for request, _ in self.relays.values():
            request.transport.close()
        for t in self._tasks:
            t.cancel()

    async def stats(self, _r):
        return web.json_response({
            "role": self.role, "model_id": "fake-model", "ready": self.ready, "draining": False,
            "queue_depth": self.queue_depth, "queued_tokens": 0, "max_queue": self.max_queue, "running": 0,
            "free_blocks": self.free_blocks, "total_blocks": 1000, "block_size": 16, "max_context": 4096})

    async def prefill(self, request):
        self.prefill_calls += 1
        msg = await request.json()
        if self.prefill_status != 200:
            return web.json_response({"error": {"message": f"fake says {self.prefill_status}"}},
                                     status=self.prefill_status, headers={"Retry-After": "3"})
        ids = msg["prompt_ids"] or [1, 2, 3]
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"type":"heartbeat"}\n')
        first = {"type": "token", "token_id": 100, "text": "A", "finished": False, "finish_reason": None}
        result = {"type": "prefilled", "request_id": msg["request_id"], "prompt_ids": ids, "first": first,
                  "kv": {"host": "", "port": 9}}
        await resp.write((json.dumps(result) + "\n").encode())
        return resp

    async def relay(self, request):
        relay_id = request.query["id"]
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write((json.dumps({"type": "hello", "relay": relay_id}) + "\n").encode())
        self.relays[relay_id] = (request, resp)
        try:
            while True:
                if not self.silent:
                    await resp.write(b'{"type":"heartbeat"}\n')
                await asyncio.sleep(0.1)
        finally:
            self.relays.pop(relay_id, None)

    async def decode(self, request):
        self.decode_calls += 1
        msg = await request.json()
        if self.refuse_decode:
            request.transport.abort()
            return web.Response()
        if msg["relay"] not in self.relays:
            return web.json_response({"error": {"message": "no such relay"}}, status=409)
        self.decoded.append(msg["request_id"])
        task = asyncio.create_task(self._emit(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"request_id": msg["request_id"], "prompt_tokens": len(msg["prompt_ids"])})

    async def _emit(self, msg):
        relay_request, relay = self.relays[msg["relay"]]
        rid, mode = msg["request_id"], msg["prompt_ids"][0]
        for i in range(1, self.tokens):
            if rid in self.aborts:
                return
            last = i == self.tokens - 1
            text = f"-{i}".ljust(self.big_text_bytes if mode == BIG else 0, ".")
            frame = {"type": "step", "tokens": {rid: [[100 + i], [text], "length" if last else None]}}
            try:
                await relay.write((json.dumps(frame) + "\n").encode())
            except ConnectionError:
                return  # the relay stream is gone, and the request with it
            await asyncio.sleep(0.01)
            if mode == DIE and i == 2:
                relay_request.transport.abort()  # the worker process dies mid-stream
                return
            if mode == SILENT and i == 2:
                self.silent = True  # hung: no tokens, no heartbeats
                return

    async def abort(self, request):
        self.aborts.append((await request.json())["request_id"])
        return web.json_response({"aborted": True})


@pytest.fixture
async def cluster():
    """Start fakes and a router: `await cluster(prefills, decodes, **config)` -> router URL."""
    runners = []

    async def start(prefills, decodes, **config):
        for w in prefills + decodes:
            # A fake may hold a handler open for good (FrozenDecode): its cleanup cancels it after 2 s,
            # not aiohttp's 60, which outlasted the 30 s bound below in one full-suite run.
            runner, port = await start_site(w.app(), "127.0.0.1", 0, shutdown_timeout=2.0)
            runners.append(runner)
            w.url = f"127.0.0.1:{port}"
        router = Router(RouterConfig(prefill=[w.url for w in prefills], decode=[w.url for w in decodes],
                                     poll_s=0.1, **config))
        runner, port = await start_site(router.app(), "127.0.0.1", 0)
        runners.append(runner)
        return f"http://127.0.0.1:{port}", router

    yield start
    for r in reversed(runners):
        # In a task of its own: awaited inline, the cleanup after a frozen decode fake (its /decode handler
        # never returns) hung in about half the runs. Bounded either way.
        await asyncio.wait_for(asyncio.ensure_future(r.cleanup()), 30)


async def sse_events(resp) -> list:
    out = []
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data: "):
            data = line[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


async def test_streamed_completion_format(cluster):
    url, _ = await cluster([FakeWorker("prefill")], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        body = {"prompt": [5, 6], "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
        async with s.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "A-1-2-3-4"
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert events[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_chat_completion_streamed_and_not(cluster):
    url, _ = await cluster([FakeWorker("prefill")], [FakeWorker("decode")])
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 5}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json=body) as resp:
            data = await resp.json()
        async with s.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = await sse_events(resp)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "A-1-2-3-4"}
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 5
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": "A"}
    assert "".join(d.get("content", "") for d in deltas) == "A-1-2-3-4"
    assert events[-2]["object"] == "chat.completion.chunk" and events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Invalid JSON"),
        (json.dumps({"max_tokens": 3}).encode(), "prompt"),
        (json.dumps({"prompt": "", "max_tokens": 3}).encode(), "prompt is empty"),
        (json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
        (json.dumps({"prompt": "x", "temperature": 9}).encode(), "temperature"),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"prompt": ["a", "b"]}).encode(), "one prompt per request"),
    ],
)
async def test_bad_requests_get_400_with_an_openai_error(cluster, body, message):
    prefill = FakeWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", data=body,
                          headers={"Content-Type": "application/json"}) as resp:
            data = await resp.json()
    assert resp.status == 400
    assert data["error"]["type"] == "invalid_request_error" and message in data["error"]["message"]
    assert prefill.prefill_calls == 0


async def test_ten_megabyte_prompt_is_a_413_and_the_router_carries_on(cluster):
    url, _ = await cluster([FakeWorker("prefill")], [FakeWorker("decode")], max_body_bytes=1 << 20)
    big = json.dumps({"prompt": "x" * (10 << 20), "max_tokens": 4}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", data=big) as resp:
            data = await resp.json()
            assert resp.status == 413 and "limit" in data["error"]["message"]

        async def chunked():  # no Content-Length: the limit must hold while reading
            for _ in range(10):
                yield b"x" * (1 << 20)

        async with s.post(f"{url}/v1/completions", data=chunked()) as resp:
            assert resp.status == 413
        async with s.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 5}) as resp:
            assert resp.status == 200


async def test_full_prefill_queues_give_429_before_any_work(cluster):
    prefill = FakeWorker("prefill", queue_depth=8, max_queue=8)
    url, router = await cluster([prefill], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": "x"}) as resp:
            data = await resp.json()
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            assert data["error"]["type"] == "rate_limit_error"
    assert prefill.prefill_calls == 0
    counts = {s.labels["outcome"]: s.value for s in
              next(m for m in router.registry.collect() if m.name == "disagg_requests").samples
              if s.name.endswith("_total")}
    assert counts["rejected"] == 1 and counts["ok"] == 0


async def test_router_spreads_a_burst_without_waiting_for_the_next_poll(cluster):
    prefill = FakeWorker("prefill", max_queue=3)
    url, router = await cluster([prefill], [FakeWorker("decode")])
    router.pool.poll_s = 60  # freeze the stats: only the router's own dispatch count limits the burst
    await asyncio.sleep(0.15)
    async with aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*(_status(s, url) for _ in range(10)))
    assert statuses.count(429) >= 7 and set(statuses) <= {200, 429}


async def _status(s, url) -> int:
    async with s.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 3}) as resp:
        await resp.read()
        return resp.status


async def test_prefill_refusals_pass_through(cluster):
    url, _ = await cluster([FakeWorker("prefill", prefill_status=429)], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "3"
            assert (await resp.json())["error"]["message"] == "fake says 429"


async def test_no_ready_workers_is_503(cluster):
    url, _ = await cluster([FakeWorker("prefill", ready=False)], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 503 and "no prefill instance is ready" in (await resp.text())
        async with s.get(f"{url}/readyz") as resp:
            assert resp.status == 503


async def test_decode_death_ends_every_stream_on_it_with_an_error_and_spares_the_other_instances(cluster):
    # Long streams (2 s of tokens), so the others on the dying instance are still running when it dies.
    dying, healthy = FakeWorker("decode", tokens=200), FakeWorker("decode", tokens=200)
    url, router = await cluster([FakeWorker("prefill")], [dying, healthy])
    router.pool.poll_s = 60  # no poll resets the dispatch counts: the four requests alternate instances

    async def stream(first_id):
        async with s.post(f"{url}/v1/completions", json={"prompt": [first_id, 5], "stream": True}) as resp:
            return await sse_events(resp)

    async def doomed_once_both_decode():
        while len(dying.decoded) + len(healthy.decoded) < 3:
            await asyncio.sleep(0.01)
        return await stream(DIE)

    await asyncio.sleep(0.15)
    async with aiohttp.ClientSession() as s:
        results = await asyncio.wait_for(asyncio.gather(stream(5), stream(5), stream(5),
                                                        doomed_once_both_decode()), 60)
        async with s.get(f"{url}/healthz") as resp:
            assert resp.status == 200
    by_id = {r[0]["id"]: r for r in results}
    doomed_worker = next(w for w in (dying, healthy) if results[3][0]["id"] in w.decoded)
    spared_worker = healthy if doomed_worker is dying else dying
    assert len(doomed_worker.decoded) == 2 and len(spared_worker.decoded) == 2
    for rid in doomed_worker.decoded:  # every request on the dead relay stream ends with the error
        events = by_id[rid]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 502
        assert "failed mid-request" in events[-2]["error"]["message"]
    for rid in spared_worker.decoded:
        events = by_id[rid]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "A" + "".join(f"-{i}" for i in range(1, 200))
    assert not next(w for w in router.pool.workers.values() if w.url.endswith(doomed_worker.url)).healthy


async def test_silent_decode_worker_times_out_instead_of_hanging(cluster):
    url, _ = await cluster([FakeWorker("prefill")], [FakeWorker("decode", tokens=40)], heartbeat_timeout_s=0.5)
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(f"{url}/v1/completions", json={"prompt": [SILENT], "stream": True}) as resp:
            events = await asyncio.wait_for(sse_events(resp), 10)
    assert time.monotonic() - t0 < 5
    assert events[-2]["error"]["code"] == 504 and "heartbeat" in events[-2]["error"]["message"]


async def test_refused_decode_is_retried_on_another_instance(cluster):
    # The flaky instance has the most free KV, so it is picked first.
    flaky = FakeWorker("decode", free_blocks=1000, refuse_decode=True)
    good = FakeWorker("decode", free_blocks=10)
    url, _ = await cluster([FakeWorker("prefill")], [flaky, good])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 5}) as resp:
            data = await resp.json()
    assert resp.status == 200 and data["choices"][0]["text"] == "A-1-2-3-4"
    assert flaky.decode_calls == 1 and good.decode_calls == 1


async def test_client_disconnect_aborts_the_request_downstream(cluster):
    decode = FakeWorker("decode", tokens=400)
    url, router = await cluster([FakeWorker("prefill")], [decode])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": [5], "stream": True}) as resp:
            rid = json.loads((await resp.content.readline())[6:])["id"]
    for _ in range(100):
        if decode.aborts:
            break
        await asyncio.sleep(0.02)
    assert decode.aborts == [rid]


async def test_drain_refuses_new_requests_and_finishes_running_ones(cluster):
    url, router = await cluster([FakeWorker("prefill")], [FakeWorker("decode", tokens=30)])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": [5], "stream": True}) as resp:
            await resp.content.readline()
            router.start_drain()
            assert not router.drained.is_set()
            async with s.post(f"{url}/v1/completions", json={"prompt": [5]}) as refused:
                assert refused.status == 503 and refused.headers["Retry-After"] == "1"
            async with s.get(f"{url}/readyz") as ready:
                assert ready.status == 503
            rest = await sse_events(resp)
    assert rest[-2]["choices"][0]["finish_reason"] == "length" and rest[-1] == "[DONE]"
    await asyncio.wait_for(router.drained.wait(), 2)
