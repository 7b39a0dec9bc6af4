"""The workers' relay stream with the real engine on a tiny random model: one frame per step carrying every
request's token, merging while a frame is still being written, the engine's tokens and text end to end, and
the requests of a stream that ends are aborted and their KV freed."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import RouterConfig
from disagg_runtime.serve.inprocess import InProcessDeployment
from disagg_runtime.serve.runner import start_site
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.colocated import ColocatedWorker
from disagg_runtime.workers.protocol import PrefillRequest, SamplingSpec
from disagg_runtime.workers.relay import RelayConnection


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=5)


def prompts(n: int) -> list[list[int]]:
    return [[3 + (13 * i + 5 * j) % 400 for j in range(4 + (i * 17) % 40)] for i in range(n)]


def reference(model_dir, ps: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt as the engine's own step outputs give them."""
    engine = Engine.load(model_dir, num_blocks=512)
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(ps)]
    ids: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    text: dict[str, str] = {r.request_id: "" for r in reqs}
    outs = engine.prefill(reqs)
    while outs:
        for out in outs:
            ids[out.request_id].append(out.token_id)
            text[out.request_id] += out.text
        outs = engine.decode()
    return [ids[r.request_id] for r in reqs], [text[r.request_id] for r in reqs]


def _submit(worker: ColocatedWorker, sink, rid: str, prompt: list[int], max_tokens: int) -> None:
    msg = PrefillRequest(request_id=rid, prompt_ids=prompt, sampling=SamplingSpec(max_tokens=max_tokens))
    assert worker._enqueue(worker._job(msg, list(prompt), sink))


async def test_each_step_is_one_frame_with_every_requests_token_and_steps_merge_while_one_is_written(model_dir):
    # Driven step by step on this thread (the engine thread is not started).
    ps = prompts(3)
    want_ids, want_text = reference(model_dir, ps, max_tokens=5)
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=512), WorkerConfig())
    worker.loop = asyncio.get_running_loop()
    conn = RelayConnection("r")
    for i, p in enumerate(ps):
        _submit(worker, conn, f"r{i}", p, 5)
    got_ids: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    got_text = dict.fromkeys(got_ids, "")

    def take() -> dict:
        frame = json.loads(conn.take_frame())
        for rid, (ids, texts, _reason) in frame["tokens"].items():
            assert len(texts) == len(ids)  # each token's own text
            got_ids[rid] += ids
            got_text[rid] += "".join(texts)
        return frame["tokens"]

    assert worker._step()  # one prefill batch: every request's first token
    await asyncio.sleep(0)  # the event loop takes the step's outputs
    assert {rid: len(e[0]) for rid, e in take().items()} == dict.fromkeys(got_ids, 1)
    assert conn.take_frame() is None
    # Two steps before the writer comes back (its last write still in flight): one frame, two tokens each.
    assert worker._step() and worker._step()
    await asyncio.sleep(0)
    assert {rid: len(e[0]) for rid, e in take().items()} == dict.fromkeys(got_ids, 2)
    assert worker._step() and worker._step()
    await asyncio.sleep(0)
    last = take()
    assert {rid: e[2] for rid, e in last.items()} == dict.fromkeys(got_ids, "length")
    assert [got_ids[f"r{i}"] for i in range(3)] == want_ids
    assert [got_text[f"r{i}"] for i in range(3)] == want_text
    assert not worker.jobs


async def test_tokens_and_text_through_the_router_equal_the_engines(model_dir):
    ps = prompts(8)
    want_ids, want_text = reference(model_dir, ps, max_tokens=10)
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=512), WorkerConfig())
    dep = InProcessDeployment([], [], RouterConfig(prefill=[], decode=[]), colocated=[worker])

    async def complete(s, prompt, stream: bool) -> tuple[list[int], str]:
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "return_token_ids": True, "stream": stream}
        async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            if not stream:
                choice = (await resp.json())["choices"][0]
                return choice["token_ids"], choice["text"]
            ids, text = [], ""
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    ids += choice["token_ids"]
                    text += choice["text"]
            return ids, text

    async with dep, aiohttp.ClientSession() as s:
        streamed = await asyncio.gather(*(complete(s, p, True) for p in ps))
        whole = await asyncio.gather(*(complete(s, p, False) for p in ps))
        assert len(worker.relay.connections) == 1  # one stream from the router carried all sixteen requests
    assert [ids for ids, _ in streamed] == [ids for ids, _ in whole] == want_ids
    assert [text for _, text in streamed] == [text for _, text in whole] == want_text


async def test_when_a_relay_stream_ends_its_requests_are_aborted_and_their_kv_freed(model_dir):
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=512), WorkerConfig(heartbeat_s=0.2))
    runner, port = await start_site(worker.app(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            relay = await s.get(f"{url}/relay", params={"id": "router-1"})
            assert json.loads(await relay.content.readline()) == {"type": "hello", "relay": "router-1"}
            async with s.get(f"{url}/relay", params={"id": "router-1"}) as again:
                assert again.status == 409
            body = {"request_id": "long", "prompt_ids": [5, 6, 7], "relay": "router-1",
                    "sampling": {"max_tokens": 400, "ignore_eos": True}}
            async with s.post(f"{url}/generate", json={**body, "relay": "nobody"}) as resp:
                assert resp.status == 409 and "not open" in (await resp.json())["error"]["message"]
            async with s.post(f"{url}/generate", json=body) as resp:
                assert resp.status == 200 and await resp.json() == {"request_id": "long", "prompt_tokens": 3}
            tokens = 0
            while tokens < 3:
                frame = json.loads(await relay.content.readline())
                tokens += len(frame.get("tokens", {}).get("long", [[]])[0])
            relay.close()  # the router went away mid-request
            for _ in range(300):
                if not worker.jobs and worker.engine.free_blocks == worker.engine.total_blocks:
                    break
                await asyncio.sleep(0.02)
            assert not worker.jobs and worker.engine.free_blocks == worker.engine.total_blocks
            assert not worker.relay.connections
    finally:
        await runner.cleanup()


async def test_a_worker_that_shuts_down_ends_its_requests_with_503_on_the_stream(model_dir):
    worker = ColocatedWorker(Engine.load(model_dir, num_blocks=512), WorkerConfig())
    runner, port = await start_site(worker.app(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        relay = await s.get(f"{url}/relay", params={"id": "r"})
        await relay.content.readline()
        body = {"request_id": "long", "prompt_ids": [5, 6, 7], "relay": "r",
                "sampling": {"max_tokens": 400, "ignore_eos": True}}
        async with s.post(f"{url}/generate", json=body) as resp:
            assert resp.status == 200
        stopping = asyncio.create_task(runner.cleanup())
        errors = {}
        async for line in relay.content:
            errors.update(json.loads(line).get("errors", {}))
        await stopping
    assert errors == {"long": [503, "colocated worker is shutting down"]}
