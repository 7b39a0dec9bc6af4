"""Workers over an ipc KV link read staged KV directly: same tokens as one engine, no KV sent by the
prefill worker, every staging freed by the decode worker's release; KV that expired before its read fails
its request with a clear error instead of decoding from bytes that are no longer its KV."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from disagg_runtime.engine import Engine
from disagg_runtime.router.app import RouterConfig
from disagg_runtime.serve.inprocess import InProcessDeployment
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.decode import DecodeWorker
from disagg_runtime.workers.prefill import PrefillWorker
from test_router import sse_events
from test_workers import complete, prompts_of, reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from disagg_runtime.models.testing import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=3)


def _samples(worker, name: str) -> dict[tuple, float]:
    metric = {m.name: m for m in worker.registry.collect()}.get(name)
    return {} if metric is None else {tuple(sorted(s.labels.items())): s.value for s in metric.samples
                                      if s.name.endswith("_total") or s.name.endswith("_count")}


async def _until(condition, what: str, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_ipc_link_reads_staged_kv_directly_and_releases_it(model_dir, file_system_sharing):
    prompts = prompts_of(model_dir, 6)
    want = reference(model_dir, prompts, max_tokens=10)
    config = WorkerConfig(kv_channel="ipc")
    p = PrefillWorker(Engine.load(model_dir, num_blocks=256), config)
    d = DecodeWorker(Engine.load(model_dir, num_blocks=256), config)
    async with InProcessDeployment([p], [d], RouterConfig(prefill=[], decode=[])) as dep, \
            aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(complete(s, dep.url, prompt, 10) for prompt in prompts))
        # Releases are confirmed while the decode worker imports; the prefill engine frees right after.
        await _until(lambda: not p.parked and p.engine.free_blocks == p.engine.total_blocks,
                     "the prefill worker to free every released request")
    assert [g["choices"][0]["token_ids"] for g in got] == want
    reads = _samples(d, "disagg_kv_transfer_seconds")
    assert sum(v for k, v in reads.items() if ("channel", "ipc-direct") in k) == len(prompts)
    assert not _samples(p, "disagg_kv_transfer_seconds")  # the prefill worker sent no payload
    assert not p.parked and p.engine.kv_export.staged_bytes == 0
    assert p.engine.free_blocks == p.engine.total_blocks and d.engine.free_blocks == d.engine.total_blocks


class SlowReleases(PrefillWorker):
    """A prefill worker that takes 0.3 s to refuse the release of KV it no longer holds (a busy one)."""

    async def release_pulled(self, request_id, ticket):
        if request_id not in self.parked:
            await asyncio.sleep(0.3)
        await super().release_pulled(request_id, ticket)


async def test_kv_that_expired_before_its_direct_read_fails_the_request(model_dir, file_system_sharing):
    # One decode slot: the second request waits behind the first for longer than the prefill keeps its KV.
    # Its answers to releases come late, so decode steps on the unconfirmed KV run before the verdict.
    p = SlowReleases(Engine.load(model_dir, num_blocks=256), WorkerConfig(kv_channel="ipc", kv_ttl_s=0.05))
    d = DecodeWorker(Engine.load(model_dir, num_blocks=256), WorkerConfig(kv_channel="ipc", max_batch=1))
    async with InProcessDeployment([p], [d], RouterConfig(prefill=[], decode=[])) as dep, \
            aiohttp.ClientSession() as s:
        long = asyncio.create_task(complete(s, dep.url, "a long answer", 480, ignore_eos=True))
        await _until(lambda: d.jobs, "the first request to decode")

        async def late():
            body = {"prompt": "too late", "max_tokens": 8, "temperature": 0, "stream": True}
            async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    return resp.status, await resp.json()
                return resp.status, await sse_events(resp)

        second = asyncio.create_task(late())
        await _until(lambda: any(j.request.request_id not in p.parked for j in d.waiting),
                     "the waiting request's KV to expire on the prefill side")
        assert not long.done()  # it expired while the first request still held the only slot
        status, events = await second
        await long
        await _until(lambda: not d.jobs and d.engine.free_blocks == d.engine.total_blocks,
                     "the decode worker to free what the failed import took")
    # Decode steps ran on the unconfirmed KV for 0.3 s, but none of their tokens reached the client: at most
    # the prefill's first token came before the error (or the request failed before its stream began).
    if status == 200:
        tokens = [e for e in events if isinstance(e, dict) and e.get("choices")]
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    else:
        tokens, errors = [], [events["error"]]
    assert status in (200, 502) and len(tokens) <= 1, events
    assert len(errors) == 1 and "freed the KV" in errors[0]["message"], events
