"""Authentication through HTTP and TCP, with the real router, workers and engine in one event loop:
API keys at the router, the internal token on the workers' ports and KV links, KV bound to its request."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest
from disagg_runtime.engine import Engine
from disagg_runtime.kv import Endpoint, KVAddress, KVChannelError, KVForbidden, KVPuller
from disagg_runtime.kv.auth import KVAuthError
from disagg_runtime.kv.framing import FramedStream
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import RouterConfig
from disagg_runtime.security.secret_file import SecretFile, SecretFileError
from disagg_runtime.security.tokens import INTERNAL_TOKEN_HEADER, InternalToken
from disagg_runtime.serve.inprocess import InProcessDeployment
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.decode import DecodeWorker
from disagg_runtime.workers.prefill import PrefillWorker

TOKEN_A = "tok-a-" + "x" * 40
TOKEN_B = "tok-b-" + "y" * 40
KEYS = ["sk-first-key-0123456789", "sk-second-key-abcdefghij"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=5)


def write(path, *lines: str) -> str:
    """Replace the file the way Kubernetes updates a Secret volume: a new file swapped in (a new inode)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return str(path)


def worker_pair(model_dir, prefill_token: str | None, decode_token: str | None):
    def config(path):
        return WorkerConfig(internal_token_file=path)

    return (PrefillWorker(Engine.load(model_dir, num_blocks=256), config(prefill_token)),
            DecodeWorker(Engine.load(model_dir, num_blocks=256), config(decode_token)))


async def complete(session, url, headers=None, **extra):
    body = {"prompt": "the planner measures", "max_tokens": 6, "temperature": 0, **extra}
    async with session.post(f"{url}/v1/completions", json=body, headers=headers or {}) as resp:
        return resp.status, await resp.json()


async def test_router_api_keys_401_envelope_and_right_key(model_dir, tmp_path):
    token = write(tmp_path / "token", TOKEN_A)
    keys = write(tmp_path / "keys", "# issued 2026-12-01", *KEYS)
    p, d = worker_pair(model_dir, token, token)
    config = RouterConfig(prefill=[], decode=[], api_key_file=keys, internal_token_file=token)
    async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
        status, body = await complete(s, dep.url)
        assert status == 401
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"
        status, body = await complete(s, dep.url, {"Authorization": "Bearer sk-wrong"})
        assert status == 401 and "Incorrect API key" in body["error"]["message"]
        status, body = await complete(s, dep.url, {"Authorization": "Basic " + KEYS[0]})
        assert status == 401
        for headers in ({"Authorization": f"Bearer {KEYS[0]}"}, {"x-api-key": KEYS[1]}):
            status, body = await complete(s, dep.url, headers)
            assert status == 200, body
            assert body["usage"]["completion_tokens"] >= 1
        async with s.get(f"{dep.url}/v1/models") as resp:
            assert resp.status == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            async with s.get(f"{dep.url}{path}") as resp:
                assert resp.status == 200, path
        # A key never reaches the metrics (nor is it anywhere in the exposition).
        async with s.get(f"{dep.url}/metrics") as resp:
            assert KEYS[0] not in await resp.text()


async def test_metrics_behind_the_key_when_asked(model_dir, tmp_path):
    token = write(tmp_path / "token", TOKEN_A)
    keys = write(tmp_path / "keys", KEYS[0])
    p, d = worker_pair(model_dir, token, token)
    config = RouterConfig(prefill=[], decode=[], api_key_file=keys, internal_token_file=token,
                          metrics_require_key=True)
    async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
        async with s.get(f"{dep.url}/metrics") as resp:
            assert resp.status == 401
        async with s.get(f"{dep.url}/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}) as resp:
            assert resp.status == 200 and "disagg_" in await resp.text()
        async with s.get(f"{dep.url}/readyz") as resp:
            assert resp.status == 200


async def test_rotated_key_file_is_reread_without_a_restart(model_dir, tmp_path):
    token = write(tmp_path / "token", TOKEN_A)
    keys = write(tmp_path / "keys", KEYS[0])
    p, d = worker_pair(model_dir, token, token)
    config = RouterConfig(prefill=[], decode=[], api_key_file=keys, internal_token_file=token)
    async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
        assert (await complete(s, dep.url, {"Authorization": f"Bearer {KEYS[0]}"}))[0] == 200
        write(tmp_path / "keys", KEYS[1])  # KEYS[0] revoked, KEYS[1] issued
        deadline = time.monotonic() + 60
        while (await complete(s, dep.url, {"Authorization": f"Bearer {KEYS[1]}"}))[0] != 200:
            assert time.monotonic() < deadline, "the new key file was never re-read"
            await asyncio.sleep(0.2)
        assert (await complete(s, dep.url, {"Authorization": f"Bearer {KEYS[0]}"}))[0] == 401


def test_an_empty_or_missing_secret_file_refuses_to_start(tmp_path):
    with pytest.raises(SecretFileError, match="holds no value"):
        SecretFile(write(tmp_path / "keys", "# nothing issued yet"), what="API key")
    with pytest.raises(SecretFileError, match="cannot read"):
        SecretFile(tmp_path / "absent", what="API key")


async def test_workers_refuse_requests_without_the_internal_token(model_dir, tmp_path):
    token = write(tmp_path / "token", TOKEN_A)
    p, d = worker_pair(model_dir, token, token)
    config = RouterConfig(prefill=[], decode=[], internal_token_file=token)
    async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
        prefill_url, decode_url = dep.worker_urls[id(p)], dep.worker_urls[id(d)]
        prefill_body = {"request_id": "direct-1", "prompt": "skip the router", "sampling": {"max_tokens": 4}}
        decode_body = {"request_id": "forged", "prompt_ids": [1, 2, 3], "sampling": {"max_tokens": 4},
                       "first_token_id": 4, "kv": {"host": "127.0.0.1", "port": 9}}
        for headers in ({}, {INTERNAL_TOKEN_HEADER: "guess"}, {INTERNAL_TOKEN_HEADER: ",".join(["x"] * 9)}):
            for url, path, body in ((prefill_url, "/prefill", prefill_body), (decode_url, "/decode", decode_body),
                                    (prefill_url, "/abort", {"request_id": "x"}), (decode_url, "/drain", {})):
                async with s.post(f"{url}{path}", json=body, headers=headers) as resp:
                    assert resp.status == 403, (path, headers)
                    assert (await resp.json())["error"]["type"] == "permission_error"
            async with s.get(f"{prefill_url}/stats", headers=headers) as resp:
                assert resp.status == 403
            async with s.get(f"{decode_url}/relay", params={"id": "eavesdropper"}, headers=headers) as resp:
                assert resp.status == 403  # nobody else reads the token stream
        # Nothing reached the engines: no request queued, parked or decoding, and no drain started.
        assert not p.parked and not len(p.queue) and not d.jobs and not d.draining and not d.relay.connections
        # Probes and scrapes stay open; the router (which holds the token) is served.
        for url in (prefill_url, decode_url):
            for path in ("/healthz", "/readyz", "/metrics"):
                async with s.get(f"{url}{path}") as resp:
                    assert resp.status == 200
        async with s.get(f"{prefill_url}/stats", headers={INTERNAL_TOKEN_HEADER: TOKEN_A}) as resp:
            assert resp.status == 200
        status, body = await complete(s, dep.url)
        assert status == 200, body


async def _park(session, prefill_url: str, request_id: str) -> dict:
    """What the router does first: prefill a request, which parks its KV; returns the KV reference."""
    body = {"request_id": request_id, "prompt": "park this prompt", "sampling": {"max_tokens": 8}}
    async with session.post(f"{prefill_url}/prefill", json=body, headers={INTERNAL_TOKEN_HEADER: TOKEN_A}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if b'"prefilled"' in line:
                return json.loads(line)["kv"]
    raise AssertionError("no prefill result")


async def test_kv_pulls_need_the_token_and_the_requests_ticket(model_dir, tmp_path):
    token_file = write(tmp_path / "token", TOKEN_A)
    wrong_file = write(tmp_path / "wrong", TOKEN_B)
    p, d = worker_pair(model_dir, token_file, token_file)
    config = RouterConfig(prefill=[], decode=[], internal_token_file=token_file)
    async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
        address = KVAddress("127.0.0.1", p.kv_port)
        kv_a = await _park(s, dep.worker_urls[id(p)], "victim-a")
        kv_b = await _park(s, dep.worker_urls[id(p)], "victim-b")
        assert kv_a["ticket"] and kv_a["ticket"] != kv_b["ticket"]

        # No token: a raw client that opens with the protocol's hello gets the challenge, then a closed
        # connection; its hello frame is never parsed.
        raw = await FramedStream.connect(address.host, address.port, timeout=5)
        await raw.send_json({"type": "hello", "endpoint": {"node": "attacker"}})
        received = await asyncio.wait_for(raw.reader.read(), 5)  # until EOF: the server closed
        assert received[:5] == b"DKVA\x01" and len(received) <= 5 + 32 + 1
        await raw.close()
        for token in (None, InternalToken.from_file(wrong_file)):
            puller = KVPuller(local=Endpoint("attacker"), timeout=5, token=token)
            with pytest.raises(KVChannelError) as caught:
                await puller.pull(address, "victim-a", ticket=kv_a["ticket"])
            if token is not None:
                assert isinstance(caught.value, KVAuthError)
            await puller.close()

        # The token alone is not enough: another request's ticket, or none, is refused on a link that stays up.
        insider = KVPuller(local=Endpoint("insider"), timeout=5, token=InternalToken.from_file(token_file))
        try:
            for rid, ticket in (("victim-a", kv_b["ticket"]), ("victim-a", None), ("victim-b", "guessed")):
                with pytest.raises(KVForbidden):
                    await insider.pull(address, rid, ticket=ticket)
            assert set(p.parked) == {"victim-a", "victim-b"}  # nothing leaked, nothing freed
            payload = await insider.pull(address, "victim-b", ticket=kv_b["ticket"])
            assert payload.header.request_id == "victim-b"
        finally:
            await insider.close()
        # Both workers go on serving.
        for _ in range(3):
            status, body = await complete(s, dep.url)
            assert status == 200, body
        assert "victim-a" in p.parked and "victim-b" not in p.parked


async def test_old_and_new_token_holders_interoperate_during_a_rotation(model_dir, tmp_path):
    old = write(tmp_path / "old", TOKEN_A)
    new = write(tmp_path / "new", TOKEN_B, TOKEN_A)  # what the operator writes: current, then previous
    # Every pairing of old and new pods a rolling restart can produce, each serving requests.
    for prefill_file, decode_file, router_file in ((old, new, new), (new, old, old), (new, old, new),
                                                   (old, new, old)):
        p, d = worker_pair(model_dir, prefill_file, decode_file)
        config = RouterConfig(prefill=[], decode=[], internal_token_file=router_file)
        async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(complete(s, dep.url) for _ in range(4)))
            assert [status for status, _ in results] == [200] * 4, results
    # The rotation's end: a pod that knows only the new token no longer takes the old one.
    newest = write(tmp_path / "newest", TOKEN_B)
    p, d = worker_pair(model_dir, newest, newest)
    config = RouterConfig(prefill=[], decode=[], internal_token_file=old)
    async with InProcessDeployment([p], [d], config) as dep, aiohttp.ClientSession() as s:
        async with s.get(f"{dep.worker_urls[id(p)]}/stats", headers={INTERNAL_TOKEN_HEADER: TOKEN_A}) as resp:
            assert resp.status == 403


def test_metrics_require_key_needs_a_key_file():
    import argparse

    from disagg_runtime.serve.options import ServeError, add_serve_arguments, check_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--role", "router", "--endpoints-file", "e.json", "--metrics-require-key"])
    with pytest.raises(ServeError, match="--api-key-file"):
        check_serve_arguments(args)
