"""Resharded KV over real TCP KV servers: each decode rank receives exactly its share, straight from the holders."""

from __future__ import annotations

import pytest
import torch
from disagg_runtime.kv import Endpoint, KVAddress, KVNotFound, KVPuller, KVServer
from disagg_runtime.kv.codec import FP8_REL_ERROR
from disagg_runtime.kv.reshard import share_of
from disagg_runtime.kv.sharded import ShareSpec, ShareTarget, pull_spec
from disagg_runtime.kv.testing import ShareSource, make_payload
from disagg_runtime.parallel.ranks import Parallelism

LAYERS, HEADS, DIM, TOKENS = 4, 4, 8, 23
PAIRS = [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (1, 1)), ((2, 2), (2, 2)), ((2, 1), (1, 2)), ((1, 2), (4, 1))]


async def _prefill_instance(shape: Parallelism, payload):
    sources, servers = [], []
    for layout in shape.ranks():
        source = ShareSource([payload], share_of(layout, LAYERS, HEADS))
        server = KVServer(source, local=Endpoint(node="n"), host="127.0.0.1")
        await server.start()
        sources.append(source)
        servers.append(server)
    return sources, servers


@pytest.mark.parametrize(("src", "dst"), PAIRS)
@pytest.mark.parametrize("codec", ["none", "fp8"])
async def test_each_decode_rank_receives_exactly_its_share(src, dst, codec):
    src, dst = Parallelism(*src), Parallelism(*dst)
    payload = make_payload("r1", layers=LAYERS, tokens=TOKENS, heads=HEADS, dim=DIM, dtype="bfloat16")
    total = payload.header.nbytes
    sources, servers = await _prefill_instance(src, payload)
    spec = ShareSpec(sources=tuple(("127.0.0.1", s.port) for s in servers), src_tp=src.tp, src_pp=src.pp,
                     num_tokens=TOKENS)
    try:
        for rank in range(dst.world):
            received = []
            puller = KVPuller(local=Endpoint(node="n"), codec=codec, on_transfer=received.append)
            target = ShareTarget(shape=dst, rank=rank, model_id="m", dtype="bfloat16", head_dim=DIM,
                                 num_layers=LAYERS, num_kv_heads=HEADS)
            got = await pull_spec(puller, spec, target, "r1", torch.device("cpu"))
            await puller.close()
            share = target.share
            want_bytes = total * len(share.layers) * len(share.heads) // (LAYERS * HEADS)
            # Measured at the channel: the raw bytes this rank received are its share, nothing more.
            assert sum(s.raw_bytes for s in received) == want_bytes
            if dst.world > 1:
                assert want_bytes < total
            if codec == "fp8":
                assert sum(s.wire_bytes for s in received) < want_bytes
            for i, layer in enumerate(share.layers):
                for mine, full in ((got.keys[i], payload.keys[layer]), (got.values[i], payload.values[layer])):
                    expect = full[:, share.head_start:share.head_stop].float()
                    if codec == "none":
                        assert torch.equal(mine.float(), expect)
                    else:
                        assert (mine.float() - expect).abs().max() <= 2 * FP8_REL_ERROR * expect.abs().max()
        # Pieces lease nothing: every rank still holds the request until rank 0 is told to release it.
        assert all("r1" in s.parked for s in sources)
        puller = KVPuller(local=Endpoint(node="n"))
        await puller.release(KVAddress("127.0.0.1", servers[0].port), "r1")
        assert sources[0].released == ["r1"]
        with pytest.raises(KVNotFound):
            await pull_spec(puller, spec, ShareTarget(shape=dst, rank=0, model_id="m", dtype="bfloat16", head_dim=DIM,
                                                      num_layers=LAYERS, num_kv_heads=HEADS), "r1", torch.device("cpu"))
        await puller.close()
    finally:
        for server in servers:
            await server.close()


async def test_a_piece_the_rank_does_not_hold_is_refused():
    payload = make_payload("r1", layers=LAYERS, tokens=TOKENS, heads=HEADS, dim=DIM, dtype="bfloat16")
    sources, servers = await _prefill_instance(Parallelism(2, 1), payload)
    # Decode tp=1 asks rank 1 (heads 2-3) for everything: a misrouted plan must fail loudly.
    spec = ShareSpec(sources=(("127.0.0.1", servers[1].port),), src_tp=1, src_pp=1, num_tokens=TOKENS)
    puller = KVPuller(local=Endpoint(node="n"))
    try:
        with pytest.raises(ValueError, match="not held here"):
            await pull_spec(puller, spec, ShareTarget(shape=Parallelism(), rank=0, model_id="m", dtype="bfloat16",
                                                      head_dim=DIM, num_layers=LAYERS, num_kv_heads=HEADS),
                            "r1", torch.device("cpu"))
    finally:
        await puller.close()
        for server in servers:
            await server.close()
