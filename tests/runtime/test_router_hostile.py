"""The router against hostile requests: whole bodies up to the limit, slow and short bodies, encodings,
strict types, unknown models and routes, a path whose decode side is down, and a frozen worker."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from test_router import FakeWorker, cluster  # noqa: F401 - `cluster` is a fixture used below

LIMIT = 1 << 20


@dataclass
class RecordingWorker(FakeWorker):
    """A fake that takes large messages and remembers the prompt it was sent."""

    frozen: bool = False  # accept connections and read nothing back, like a SIGSTOPped process
    last_prompt: str | None = None

    def app(self) -> web.Application:
        app = super().app()
        app._client_max_size = 64 << 20
        return app

    async def stats(self, request):
        if self.frozen:
            await asyncio.sleep(3600)
        return await super().stats(request)

    async def prefill(self, request):
        if self.frozen:
            self.prefill_calls += 1
            await asyncio.sleep(3600)
        body = await request.read()
        self.last_prompt = json.loads(body)["prompt"]
        request._read_bytes = body
        return await super().prefill(request)


def envelope(data: dict) -> dict:
    assert set(data) == {"error"} and {"message", "type", "param", "code"} <= set(data["error"]), data
    return data["error"]


def padded(size: int) -> bytes:
    """A completion body of exactly `size` bytes."""
    head = b'{"max_tokens": 4, "prompt": "'
    return head + b"p" * (size - len(head) - 2) + b'"}'


async def test_a_one_megabyte_prompt_and_one_just_under_the_limit_are_served_whole(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")], max_body_bytes=LIMIT + 4096)
    async with aiohttp.ClientSession() as s:
        prompt = "word " * (LIMIT // 5)
        async with s.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}) as resp:
            assert resp.status == 200, await resp.text()
        assert prefill.last_prompt == prompt
        for size in (LIMIT + 4096, LIMIT + 4095):
            async with s.post(f"{url}/v1/completions", data=padded(size),
                              headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200, await resp.text()
            assert len(prefill.last_prompt) == size - 31
        async with s.post(f"{url}/v1/completions", data=padded(LIMIT + 4097)) as resp:
            assert resp.status == 413
            assert "limit" in envelope(await resp.json())["message"]


async def test_non_ascii_prompt_near_the_limit_reaches_the_worker_intact(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")], max_body_bytes=LIMIT)
    prompt = "日本語のテキスト" * (LIMIT // 24 - 1)  # 3 bytes a character in UTF-8, 6 as a JSON \\u escape
    body = json.dumps({"prompt": prompt}, ensure_ascii=False).encode()
    assert LIMIT - 100 < len(body) <= LIMIT
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", data=body) as resp:
            assert resp.status == 200, await resp.text()
    assert prefill.last_prompt == prompt


async def test_a_slowly_sent_body_is_read_to_its_end(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")], body_timeout_s=5)
    body = json.dumps({"prompt": "slow " * 60_000, "max_tokens": 4}).encode()

    async def trickle():
        for i in range(0, len(body), len(body) // 6 + 1):
            yield body[i:i + len(body) // 6 + 1]
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", data=trickle()) as resp:
            assert resp.status == 200, await resp.text()
    assert prefill.last_prompt == "slow " * 60_000


async def raw_exchange(url: str, head: bytes, body: bytes, *, close_after: bool = False) -> tuple[int, dict]:
    """Send `head` + `body` on a raw socket (and maybe half-close); the status and JSON of the reply."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    if close_after:
        writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    payload = raw.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(payload) if payload.strip() else {}


async def test_content_length_longer_than_the_body_waits_then_408(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")], body_timeout_s=0.5)
    body = b'{"prompt": "short"}'
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 50}\r\n\r\n").encode()
    t0 = time.monotonic()
    status, data = await raw_exchange(url, head, body)
    assert status == 408 and time.monotonic() - t0 >= 0.5
    assert "not received in time" in envelope(data)["message"]
    assert prefill.prefill_calls == 0


async def test_gzip_bodies_are_decoded_bombs_are_413_and_unknown_encodings_415(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")], max_body_bytes=LIMIT)
    ok = json.dumps({"prompt": "zipped prompt", "max_tokens": 4}).encode()
    bomb = gzip.compress(b'{"prompt": "' + b"0" * (256 << 20) + b'"}', compresslevel=9)
    assert len(bomb) < LIMIT
    async with aiohttp.ClientSession() as s:
        for encoding, data in (("gzip", gzip.compress(ok)), ("deflate", zlib.compress(ok))):
            async with s.post(f"{url}/v1/completions", data=data, headers={"Content-Encoding": encoding}) as resp:
                assert resp.status == 200, await resp.text()
            assert prefill.last_prompt == "zipped prompt"
        async with s.post(f"{url}/v1/completions", data=bomb, headers={"Content-Encoding": "gzip"}) as resp:
            assert resp.status == 413 and "after decoding" in envelope(await resp.json())["message"]
        async with s.post(f"{url}/v1/completions", data=b"\x1f\x8b not gzip at all",
                          headers={"Content-Encoding": "gzip"}) as resp:
            assert resp.status == 400 and envelope(await resp.json())
        for encoding in ("compress", "gzip, gzip", "snappy"):
            async with s.post(f"{url}/v1/completions", data=ok, headers={"Content-Encoding": encoding}) as resp:
                assert resp.status == 415, encoding
                assert "Content-Encoding" in envelope(await resp.json())["message"]
        async with s.post(f"{url}/v1/completions", json={"prompt": "still fine", "max_tokens": 2}) as resp:
            assert resp.status == 200


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 16.0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [1.5, 2]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "x", "temperature": "0"}, "temperature"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "n": 2}, "n"),
    ({}, "prompt"),
])
async def test_loosely_typed_completion_fields_are_400_naming_the_field(cluster, body, param):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 400
            err = envelope(await resp.json())
    assert err["type"] == "invalid_request_error" and err["param"].split(".")[0] == param
    assert prefill.prefill_calls == 0


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": "hi"},
    {"messages": []},
    {"messages": [{"role": "user", "content": "hi"}], "stream": "true"},
])
async def test_loosely_typed_chat_fields_are_400(cluster, body):  # noqa: F811
    url, _ = await cluster([RecordingWorker("prefill")], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 400 and envelope(await resp.json())["param"]


async def test_non_json_and_non_object_bodies_are_400(cluster):  # noqa: F811
    url, _ = await cluster([RecordingWorker("prefill")], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        for data in (b"", b"{", b"[]", b"null", b'"prompt"', b"\xff\xfe", b'{"prompt": "x"} trailing'):
            async with s.post(f"{url}/v1/completions", data=data) as resp:
                assert resp.status == 400, data
                assert envelope(await resp.json())["code"] == 400


async def test_unknown_model_is_404_and_the_served_one_is_served(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, _ = await cluster([prefill], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": "x", "model": "gpt-4"}) as resp:
            assert resp.status == 404
            err = envelope(await resp.json())
            assert err["param"] == "model" and "gpt-4" in err["message"]
        chat = {"model": "llama-70b", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(f"{url}/v1/chat/completions", json=chat) as resp:
            assert resp.status == 404
        assert prefill.prefill_calls == 0
        async with s.get(f"{url}/v1/models") as resp:
            served = (await resp.json())["data"][0]["id"]
        async with s.post(f"{url}/v1/completions", json={"prompt": "x", "model": served}) as resp:
            assert resp.status == 200


async def test_unknown_routes_and_methods_get_the_json_envelope(cluster):  # noqa: F811
    url, _ = await cluster([RecordingWorker("prefill")], [FakeWorker("decode")])
    async with aiohttp.ClientSession() as s:
        for method, path, status in (("GET", "/v1/completions", 405), ("PUT", "/v1/chat/completions", 405),
                                     ("GET", "/v1/embeddings", 404), ("POST", "/nope", 404),
                                     ("DELETE", "/v1/models", 405)):
            async with s.request(method, f"{url}{path}") as resp:
                assert resp.status == status and resp.content_type == "application/json"
                assert envelope(await resp.json())["code"] == status
                if status == 405:
                    assert "Allow" in resp.headers


async def test_decode_down_is_503_with_retry_after_before_any_prefill_work(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, router = await cluster([prefill], [FakeWorker("decode", ready=False)])
    async with aiohttp.ClientSession() as s:
        for stream in (True, False):
            body = {"prompt": "x", "max_tokens": 8, "stream": stream}
            async with s.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert "decode" in envelope(await resp.json())["message"]
    assert prefill.prefill_calls == 0


async def test_a_frozen_prefill_worker_ends_requests_in_the_timeout_and_is_marked_down(cluster):  # noqa: F811
    frozen, healthy = RecordingWorker("prefill"), RecordingWorker("prefill")
    frozen.queue_depth = -1  # the shortest queue: the router tries it first
    url, router = await cluster([frozen, healthy], [FakeWorker("decode")], response_timeout_s=0.5,
                                poll_timeout_s=60)  # the poll hangs too: the request itself finds the freeze
    frozen.frozen = True
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4}) as resp:
            assert resp.status == 200
        assert time.monotonic() - t0 < 10
    assert frozen.prefill_calls == 1 and healthy.last_prompt == "x"
    assert not next(w for w in router.pool.workers.values() if w.url.endswith(frozen.url)).healthy


async def test_a_decode_instance_that_fails_to_take_the_request_is_an_error_status_not_200(cluster):  # noqa: F811
    prefill = RecordingWorker("prefill")
    url, router = await cluster([prefill], [FakeWorker("decode", refuse_decode=True)])
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "x", "max_tokens": 8, "stream": True}
        async with s.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 503, await resp.text()
            assert "decode" in envelope(await resp.json())["message"]
    for _ in range(100):  # the KV parked on the prefill instance is released there
        if prefill.aborts:
            break
        await asyncio.sleep(0.02)
    assert prefill.aborts


async def test_a_frozen_decode_instance_fails_a_stream_before_its_200(cluster):  # noqa: F811
    decode = FrozenDecode("decode")
    url, _ = await cluster([RecordingWorker("prefill")], [decode], response_timeout_s=0.5)
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 8, "stream": True}) as resp:
            assert resp.status in (503, 504) and envelope(await resp.json())
        assert time.monotonic() - t0 < 10


@dataclass
class FrozenDecode(FakeWorker):
    """Answers /stats but never the headers of /decode."""

    async def decode(self, request):
        await asyncio.sleep(3600)
