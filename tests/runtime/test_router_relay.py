"""The router's relay against scripted workers: a client that stops reading slows only its own stream."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from disagg_runtime.router.app import Router, RouterConfig
from disagg_runtime.router.openai import ResponseWriter, sse
from disagg_runtime.serve.runner import start_site
from test_router import BIG, FakeWorker, cluster, sse_events  # noqa: F401 - `cluster` is a fixture used below

TOKENS = 300  # a BIG request sends 300 x 64 KiB: more than the sockets between router and client hold


async def _read_all(resp) -> list:
    """SSE events of a whole reply (read as bytes: a coalesced event can pass aiohttp's line limit)."""
    out = []
    for block in (await resp.content.read()).split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


async def _complete(s, url, first_id: int) -> list:
    body = {"prompt": [first_id, 5], "stream": True, "return_token_ids": True}
    async with s.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        return await sse_events(resp)


async def test_a_client_that_reads_nothing_does_not_delay_the_other_streams(cluster):  # noqa: F811
    decode = FakeWorker("decode", tokens=TOKENS)
    url, router = await cluster([FakeWorker("prefill")], [decode], coalesce_after_tokens=32)
    async with aiohttp.ClientSession() as stalled_session, aiohttp.ClientSession() as s:
        stalled = await stalled_session.post(f"{url}/v1/completions",
                                             json={"prompt": [BIG, 5], "stream": True, "return_token_ids": True})
        assert stalled.status == 200  # and nothing of it is read until the others are done
        while decode.decoded == []:
            await asyncio.sleep(0.01)
        others = await asyncio.wait_for(asyncio.gather(*(_complete(s, url, 5) for _ in range(4))), 60)
        assert len(decode.decoded) == 5 and len(router.relays.links) == 1  # all five on one relay stream
        assert not stalled.content.at_eof()
        events = await _read_all(stalled)
        stalled.release()
    want = "A" + "".join(f"-{i}" for i in range(1, TOKENS))
    for got in others:  # clients that keep up get one event per token
        assert got[-1] == "[DONE]" and [e["choices"][0]["text"] for e in got[:-1]] == ["A"] + [
            f"-{i}" for i in range(1, TOKENS)]
    # The stalled stream lost nothing: what piled up while its client did not read came as fewer, larger events.
    assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) == TOKENS
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text.replace(".", "") == want and len(text) > (TOKENS - 1) * 65536
    assert events[-2]["choices"][0]["finish_reason"] == "length" and len(events) - 1 < TOKENS


async def test_a_client_too_far_behind_has_its_stream_ended_and_aborted_and_the_others_go_on(cluster):  # noqa: F811
    decode = FakeWorker("decode", tokens=TOKENS)
    url, router = await cluster([FakeWorker("prefill")], [decode], max_buffered_tokens=20)
    async with aiohttp.ClientSession() as stalled_session, aiohttp.ClientSession() as s:
        stalled = await stalled_session.post(f"{url}/v1/completions", json={"prompt": [BIG, 5], "stream": True})
        rid = stalled.headers["X-Request-Id"]
        for _ in range(3000):  # the worker is told to drop the request it can no longer deliver
            if rid in decode.aborts:
                break
            await asyncio.sleep(0.01)
        assert decode.aborts == [rid]
        other = await asyncio.wait_for(_complete(s, url, 5), 60)
        events = await _read_all(stalled)
        stalled.release()
    assert other[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]" and "tokens behind" in events[-2]["error"]["message"]


def test_per_token_events_are_the_bytes_of_one_chunk_per_token():
    for kind in ("completion", "chat"):
        for token_ids in (False, True):
            fast, plain = (ResponseWriter(kind, "cmpl-1", "m", token_ids=token_ids) for _ in range(2))
            plain.created = fast.created
            texts, ids = ["hé", "", '"q\\', "\n", "end"], [1, 2, 3, 4, 5]
            got = fast.events(ids[:2], texts[:2], None) + fast.events(ids[2:], texts[2:], "length")
            want = b"".join(sse(plain.chunk(t, "length" if i == 4 else None, [ids[i]])) for i, t in enumerate(texts))
            assert got == want, (kind, token_ids)
            joined = ResponseWriter(kind, "cmpl-1", "m", token_ids=token_ids).events(ids, ["hé"], "length")
            assert joined.count(b"data: ") == 1 and b'"finish_reason":"length"' in joined


async def test_the_relay_stream_to_an_instance_a_replan_removed_is_closed(tmp_path):
    prefill, decode = FakeWorker("prefill"), FakeWorker("decode")
    runners = []
    for w in (prefill, decode):
        runner, port = await start_site(w.app(), "127.0.0.1", 0)
        runners.append(runner)
        w.url = f"127.0.0.1:{port}"
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"prefill": [prefill.url], "decode": [decode.url]}))
    router = Router(RouterConfig(prefill=[], decode=[], endpoints_file=str(endpoints), poll_s=0.05))
    runner, port = await start_site(router.app(), "127.0.0.1", 0)
    runners.append(runner)
    try:
        async with aiohttp.ClientSession() as s:
            events = await _complete(s, f"http://127.0.0.1:{port}", 5)
        assert events[-1] == "[DONE]" and len(decode.relays) == 1 and len(router.relays.links) == 1
        endpoints.write_text(json.dumps({"prefill": [prefill.url], "decode": []}))
        for _ in range(500):
            if not decode.relays and not router.relays.links:
                break
            await asyncio.sleep(0.02)
        assert not decode.relays and not router.relays.links
    finally:
        for r in reversed(runners):
            await r.cleanup()
