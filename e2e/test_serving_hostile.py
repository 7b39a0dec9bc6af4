"""Hostile requests against real processes (router -> prefill -> decode on CPU): long and compressed bodies
read whole by every hop, refusals in the JSON envelope from the workers too."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import pytest
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.security.tokens import INTERNAL_TOKEN_HEADER, InternalToken
from disagg_runtime.serve.local import LocalCluster

from .conftest import complete


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    model_dir = write_random_model(tmp_path_factory.mktemp("hostile") / "tiny-llama", seed=17)
    with LocalCluster(model_dir=model_dir, port=0, worker_args=["--device", "cpu", "--num-kv-blocks", "256"],
                      router_args=["--max-body-bytes", str(2 << 20)]) as cluster:
        yield cluster


async def test_a_one_megabyte_prompt_is_read_whole_and_refused_for_the_context_not_as_bad_json(serving):
    body = json.dumps({"prompt": "lorem ipsum " * ((1 << 20) // 12), "max_tokens": 4}).encode()
    assert len(body) > 1 << 20
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{serving.url}/v1/completions", data=body,
                          headers={"Content-Type": "application/json"}) as resp:
            data = await resp.json()
    assert resp.status == 400, data
    message = data["error"]["message"]
    assert "context" in message and "JSON" not in message, message


async def ready(s: aiohttp.ClientSession, url: str) -> None:
    """Until the router sees its workers (a loaded machine can miss a poll after the megabyte prompt)."""
    for _ in range(300):
        async with s.get(f"{url}/readyz") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError("the router did not see ready workers within 30 s")


async def test_a_gzipped_request_is_served_end_to_end(serving):
    body = gzip.compress(json.dumps({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}).encode())
    async with aiohttp.ClientSession() as s:
        await ready(s, serving.url)
        async with s.post(f"{serving.url}/v1/completions", data=body,
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["usage"]["completion_tokens"] == 4
        await ready(s, serving.url)
        assert await complete(s, serving.url, [5, 6, 7], stream=True)


async def test_workers_answer_every_error_in_the_envelope(serving):
    prefill = f"http://127.0.0.1:{serving.ports['prefill-0']}"
    decode = f"http://127.0.0.1:{serving.ports['decode-0']}"
    # The router's own credential: without it a worker answers 403 before anything else (issue 18's tests).
    token = InternalToken.from_file(serving.token_file)
    async with aiohttp.ClientSession(headers={INTERNAL_TOKEN_HEADER: token.header_value()}) as s:
        for method, url, status in (("GET", f"{prefill}/prefill", 405), ("GET", f"{decode}/nope", 404),
                                    ("POST", f"{prefill}/prefill", 400)):
            async with s.request(method, url, data=b"{not json") as resp:
                assert resp.status == status and resp.content_type == "application/json"
                err = (await resp.json())["error"]
                assert err["code"] == status and err["message"]
        async with s.post(f"{prefill}/prefill", data=b"x", headers={"Content-Encoding": "br, zstd"}) as resp:
            assert resp.status == 415
    assert all(p.poll() is None for p in serving.processes.values())
