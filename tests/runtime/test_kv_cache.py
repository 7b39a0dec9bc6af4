"""Paged KV cache: block accounting, on-demand admission (too large vs temporarily full), and KV import checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from disagg_runtime.engine import (
    BlockAllocator,
    Engine,
    GenerationRequest,
    KVCacheFull,
    KVMismatchError,
    PagedKVCache,
    RequestTooLarge,
    SamplingParams,
)


def _req(rid: str, n: int, max_tokens: int, seed: int = 0) -> GenerationRequest:
    ids = torch.randint(4, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens))


def _drain(engine: Engine, into: dict[str, list[int]]) -> None:
    while engine.num_running:
        for out in engine.decode():
            into[out.request_id].append(out.token_id)


def test_allocator_is_all_or_nothing():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.free == 1
    with pytest.raises(KVCacheFull, match="need 2 KV blocks, 1 of 4 free"):
        alloc.allocate(2)
    assert alloc.free == 1
    alloc.release(a)
    assert sorted(alloc.allocate(4)) == [0, 1, 2, 3]


def test_cache_round_trips_a_sequence_through_scattered_blocks():
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3,
                         dtype=torch.float32, device=torch.device("cpu"))
    table = [6, 1, 4]
    keys = [torch.randn(10, 2, 3) for _ in range(2)]
    values = [torch.randn(10, 2, 3) for _ in range(2)]
    cache.write(table, keys, values)
    assert torch.equal(cache.layers[0].keys[1, 0], keys[0][4])  # token 4 is the first of the 2nd block
    got_k, got_v = cache.read(table, 10)
    assert all(torch.equal(a, b) for a, b in zip(got_k + got_v, keys + values, strict=True))
    assert PagedKVCache.bytes_per_block(num_layers=2, block_size=4, num_kv_heads=2, head_dim=3,
                                        dtype=torch.bfloat16) == 2 * 2 * 4 * 2 * 3 * 2


def test_request_that_can_never_fit_is_refused(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=8, block_size=4)  # 32 tokens of KV; model context 512
    with pytest.raises(RequestTooLarge, match="needs 9 KV blocks; the cache has 8"):
        engine.prefill([_req("big", 30, 4)])  # 33 tokens of KV
    engine.check_admissible(30, 3)  # exactly 32 tokens: fits
    with pytest.raises(RequestTooLarge, match="exceeds the model context of 512"):
        engine.check_admissible(500, 13)
    assert engine.free_blocks == 8 and engine.request_ids == []


def test_temporarily_full_cache_refuses_then_admits_and_running_requests_are_unaffected(llama_dir):
    alone = Engine.load(llama_dir, num_blocks=64).generate([_req("a", 20, 12, seed=1)])["a"]
    engine = Engine.load(llama_dir, num_blocks=10, block_size=4)  # 40 tokens of KV, watermark 1 block
    got = {o.request_id: [o.token_id] for o in engine.prefill([_req("a", 20, 12, seed=1)])}  # prompt: 5 blocks
    assert engine.free_blocks == 5 and engine.watermark_blocks == 1
    assert engine.can_admit(16) and not engine.can_admit(17)  # 4 blocks + the watermark fit, 5 do not
    for _ in range(3):
        got["a"] += [o.token_id for o in engine.decode()]
    assert engine.free_blocks == 4  # 23 tokens cached: a grew into a 6th block
    with pytest.raises(KVCacheFull, match=r"needs 4 KV blocks \(\+1 watermark\), 4 of 10 free"):
        engine.prefill([_req("b", 16, 4, seed=2)])
    late = _req("b", 12, 4, seed=2)
    with pytest.raises(KVCacheFull):  # the whole batch is refused, nothing admitted
        engine.prefill([_req("c", 1, 1), late])
    assert engine.request_ids == ["a"] and engine.free_blocks == 4
    _drain(engine, got)
    assert got["a"] == alone and engine.free_blocks == 10
    got.update({o.request_id: [o.token_id] for o in engine.prefill([late])})
    _drain(engine, got)
    assert len(got["b"]) == 4


def test_import_refuses_mismatched_kv_and_leaves_the_engine_untouched(llama_dir, opt_dir):
    source = Engine.load(llama_dir, num_blocks=16)
    req = _req("x", 12, 5)
    first = source.prefill([req])[0].token_id
    payload = source.export_kv("x")
    target = Engine.load(llama_dir, num_blocks=16)
    with pytest.raises(KVMismatchError, match="12 tokens, the prompt has 11"):
        target.import_kv(dataclasses.replace(req, prompt_ids=req.prompt_ids[:-1]), payload, first)
    bad_dtype = dataclasses.replace(payload, keys=[k.half() for k in payload.keys])
    with pytest.raises(KVMismatchError, match="layer 0 K"):
        target.import_kv(req, bad_dtype, first)
    with pytest.raises(KVMismatchError, match="this engine is"):
        Engine.load(opt_dir, num_blocks=16).import_kv(req, payload, first)
    tight = Engine.load(llama_dir, num_blocks=2, block_size=4)
    with pytest.raises(RequestTooLarge):
        tight.import_kv(req, payload, first)
    assert target.request_ids == [] and target.free_blocks == 16
    target.import_kv(req, payload, first)
    assert target.request_ids == ["x"]
    busy = Engine.load(llama_dir, num_blocks=6, block_size=4)  # 24 tokens; the import's prompt needs 3 blocks
    busy.prefill([_req("running", 13, 4, seed=3)])  # its prompt: 4 blocks
    with pytest.raises(KVCacheFull, match="need 3 KV blocks, 2 of 6 free"):
        busy.import_kv(req, payload, first)
    assert busy.request_ids == ["running"] and busy.free_blocks == 2
