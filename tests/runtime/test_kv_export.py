"""Layer-wise KV export: staged from the prefill forward, byte-identical to the whole-cache gather, freed on release."""

from __future__ import annotations

import asyncio

import pytest
import torch
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.kv import KVAddress, KVPuller, KVServer
from disagg_runtime.kv.links import Endpoint
from disagg_runtime.kv.staged import staged_nbytes
from disagg_runtime.kv.testing import DictSource
from disagg_runtime.models.testing import write_random_model

LENGTHS = (3, 17, 40, 64)  # within one block, across blocks, exactly 4 blocks of 16


def _requests(prefix: str = "r", lengths=LENGTHS) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(5)
    return [GenerationRequest(f"{prefix}{i}", torch.randint(4, 500, (n,), generator=gen).tolist(),
                              SamplingParams(max_tokens=4)) for i, n in enumerate(lengths)]


def _assert_staged_as_gathered(engine, reqs, on_cuda: bool = False) -> None:
    """Every request's staging is complete (on the GPU, if `on_cuda`) and holds the bytes a gather of its
    blocks reads (the old export_kv)."""
    for req in reqs:
        staged = engine.kv_export.get(req.request_id)
        assert staged is not None and staged.complete
        assert staged.buffer.is_cuda or not on_cuda
        blocks = engine._seqs[req.request_id].block_table
        _bit_equal(engine.export_kv(req.request_id), engine.kv_export.gather(blocks, req.request_id,
                                                                             len(req.prompt_ids)))


def _bit_equal(a, b) -> None:
    assert a.header == b.header
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


@pytest.mark.parametrize("variant", ["llama", "opt", "qwen2"])
def test_layerwise_export_has_the_bytes_of_the_whole_export(model_dirs, variant):
    engine = Engine.load(model_dirs[variant], num_blocks=64)
    reqs = _requests()
    engine.prefill(reqs, reserve_decode=False)
    _assert_staged_as_gathered(engine, reqs)
    # A decodable prefill (a colocated engine) stages nothing: its export is the gather, same bytes.
    other = Engine.load(model_dirs[variant], num_blocks=64)
    other.prefill(_requests(), reserve_decode=True)
    assert other.kv_export.staged_bytes == 0
    for req in reqs:
        _bit_equal(other.export_kv(req.request_id), engine.export_kv(req.request_id))


def test_each_layer_is_staged_while_the_forward_computes_the_next(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=64)
    reqs = _requests()
    seen: list[list[int]] = []
    layers = engine.model.model.layers

    def before(layer_idx):
        def hook(_module, _args):
            seen.append([engine.kv_export.get(r.request_id).ready for r in reqs])
        return hook

    handles = [layer.register_forward_pre_hook(before(i)) for i, layer in enumerate(layers)]
    try:
        engine.prefill(reqs, reserve_decode=False)
    finally:
        for h in handles:
            h.remove()
    # When layer i starts, layers 0..i-1 of every request are staged already, not only at the end.
    assert seen == [[i] * len(reqs) for i in range(len(layers))]


def test_released_and_aborted_requests_free_their_staging(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=64)
    reqs = _requests()
    engine.prefill(reqs, reserve_decode=False)
    one = engine.kv_export.get("r0").nbytes
    assert engine.kv_export.staged_bytes > one > 0
    engine.release("r0")
    engine.abort("r1")
    assert engine.kv_export.get("r0") is None and engine.kv_export.get("r1") is None
    for rid in ("r2", "r3"):
        engine.abort(rid)
    assert engine.kv_export.staged_bytes == 0 and engine.free_blocks == engine.total_blocks


def test_requests_over_the_staging_budget_are_gathered_when_pulled(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=64)
    reqs = _requests()
    header = engine.kv_export.header("x", LENGTHS[0])
    engine.kv_export.budget_bytes = staged_nbytes(header)  # room for the 3-token prompt only
    engine.prefill(reqs, reserve_decode=False)
    assert engine.kv_export.get("r0") is not None
    assert [engine.kv_export.get(r.request_id) for r in reqs[1:]] == [None] * 3
    reference = Engine.load(llama_dir, num_blocks=64)
    reference.prefill(_requests(), reserve_decode=True)
    for req in reqs:
        _bit_equal(engine.export_kv(req.request_id), reference.export_kv(req.request_id))


def test_a_failed_forward_leaves_no_staging_and_fails_waiting_senders(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=64)
    waiting = []

    def boom(_module, _args):
        staged = engine.kv_export.get("r0")
        waiting.append(staged)
        raise RuntimeError("device fell over")

    handle = engine.model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="device fell over"):
            engine.prefill(_requests(), reserve_decode=False)
    finally:
        handle.remove()
    assert engine.kv_export.staged_bytes == 0 and engine.kv_export.get("r0") is None
    staged = waiting[0]
    assert staged.ready == 1  # layer 0 made it before the failure

    from disagg_runtime.kv.staged import KVStagingError

    with pytest.raises(KVStagingError, match="device fell over"):
        asyncio.run(staged.wait_ready(2))


class _EngineSource(DictSource):
    """Serves a prefill-only engine's staged KV, as the prefill worker does, and releases it on ack."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    async def checkout(self, request_id, ticket=None):
        from disagg_runtime.kv import KVLease

        staged = self.engine.kv_export.get(request_id)

        async def release(ok):
            self.released.append((request_id, ok))
            if ok:
                self.engine.release(request_id)

        return KVLease(staged.header, staged, release)


@pytest.mark.parametrize("channel", ["tcp", "nccl"])
async def test_staged_kv_pulls_in_one_batch_and_is_freed_after_the_ack(llama_dir, channel):
    engine = Engine.load(llama_dir, num_blocks=64)
    reqs = _requests()
    engine.prefill(reqs, reserve_decode=False)
    want = {r.request_id: engine.export_kv(r.request_id) for r in reqs}
    want = {rid: type(p)(p.header, [k.clone() for k in p.keys], [v.clone() for v in p.values])
            for rid, p in want.items()}
    source = _EngineSource(engine)
    here = Endpoint("node-a")
    server = KVServer(source, local=here, host="127.0.0.1", timeout=5.0)
    await server.start()
    stats = []
    puller = KVPuller(local=here, channel=channel, timeout=5.0, on_transfer=stats.append)
    try:
        for req in reqs:
            _bit_equal(await puller.pull(KVAddress("127.0.0.1", server.port), req.request_id),
                       want[req.request_id])
        await asyncio.sleep(0)
    finally:
        await puller.close()
        await server.close()
    assert [s.batches for s in stats] == [1] * len(reqs)  # a complete staging ships as one batch
    assert sorted(r for r, ok in source.released if ok) == sorted(want)
    assert engine.kv_export.staged_bytes == 0 and engine.free_blocks == engine.total_blocks


async def test_served_requests_ship_staged_kv_and_leave_no_staging_behind(llama_dir):
    import aiohttp
    from disagg_runtime.router.app import RouterConfig
    from disagg_runtime.serve.inprocess import InProcessDeployment
    from disagg_runtime.workers.base import WorkerConfig
    from disagg_runtime.workers.decode import DecodeWorker
    from disagg_runtime.workers.prefill import PrefillWorker

    prefill_engine = Engine.load(llama_dir, num_blocks=128)
    gathered = []
    real_gather = prefill_engine.kv_export.gather
    prefill_engine.kv_export.gather = lambda *a: gathered.append(a) or real_gather(*a)  # a spy, not a stub
    p = PrefillWorker(prefill_engine, WorkerConfig())
    d = DecodeWorker(Engine.load(llama_dir, num_blocks=128), WorkerConfig())
    prompts = [r.prompt_ids for r in _requests()]
    solo = Engine.load(llama_dir, num_blocks=64)
    want = solo.generate([GenerationRequest(f"w{i}", q, SamplingParams(max_tokens=6, ignore_eos=True))
                          for i, q in enumerate(prompts)])
    async with InProcessDeployment([p], [d], RouterConfig(prefill=[], decode=[])) as dep, \
            aiohttp.ClientSession() as s:

        async def one(prompt):
            body = {"prompt": prompt, "max_tokens": 6, "ignore_eos": True, "temperature": 0,
                    "return_token_ids": True}
            async with s.post(f"{dep.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                return (await resp.json())["choices"][0]["token_ids"]

        got = await asyncio.gather(*(one(q) for q in prompts))
        await asyncio.sleep(0.05)
        staged_after = prefill_engine.kv_export.staged_bytes
        free_after = prefill_engine.free_blocks
    assert got == [want[f"w{i}"] for i in range(len(prompts))]
    assert gathered == []  # every pull shipped the staging, none gathered blocks
    assert staged_after == 0 and free_after == prefill_engine.total_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_gpu_prefill_stages_the_bytes_of_the_whole_export(llama_dir):
    engine = Engine.load(llama_dir, device="cuda", dtype=torch.bfloat16, num_blocks=64, cuda_graphs=False)
    assert engine.gpu_runner is not None  # the fused path, not the torch backend
    calls: list[int] = []
    exporter = engine.kv_export
    real = exporter._after_layer
    exporter._after_layer = lambda i: calls.append(i) or real(i)  # a spy: which layers the fused forward staged
    reqs = _requests()
    engine.prefill(reqs, reserve_decode=False)
    torch.cuda.synchronize()
    assert calls == list(range(engine.num_layers))  # staged from inside the forward, layer by layer
    assert engine.gpu_runner.fused.after_prefill_layer is None  # decode steps never call it
    _assert_staged_as_gathered(engine, reqs, on_cuda=True)
    for req in reqs:
        engine.release(req.request_id)
    assert exporter.staged_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_prefill_replayed_from_a_graph_stages_the_bytes_of_the_whole_export(tmp_path):
    # A graph calls no per-layer hook: the staging is filled after the forward, with the same bytes.
    path = write_random_model(tmp_path, arch="llama", seed=9, num_hidden_layers=2, hidden_size=256,
                              intermediate_size=512, num_attention_heads=2, num_key_value_heads=1)  # head dim 128
    engine = Engine.load(path, device="cuda", dtype=torch.bfloat16, num_blocks=64)
    reqs = _requests()
    graphs = engine.gpu_runner.prefill_graphs
    assert graphs is not None and graphs.fits(sum(len(r.prompt_ids) for r in reqs), len(reqs))
    engine.prefill(reqs, reserve_decode=False)
    torch.cuda.synchronize()
    _assert_staged_as_gathered(engine, reqs, on_cuda=True)
