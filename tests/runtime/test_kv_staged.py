"""Staged KV on the wire: layers go out as they are staged, failures reach the puller, links survive a
restarted peer, and the IPC plane maps its staging buffer once per link and lets it go on close."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from disagg_runtime.kv import Endpoint, KVAddress, KVChannelError, KVLease, KVPuller, KVServer, StagedKV
from disagg_runtime.kv.codec import RawCodec
from disagg_runtime.kv.ipc import CudaIpcKVChannel
from disagg_runtime.kv.tcp import TcpKVChannel
from disagg_runtime.kv.testing import DictSource, make_payload, stream_pair

HERE = Endpoint(node="node-a")


def assert_bit_exact(got, want) -> None:
    assert got.header == want.header
    for a, b in zip(got.keys + got.values, want.keys + want.values, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class StagedSource(DictSource):
    """Parked payloads served as staged KV (what the prefill worker ships after a layer-wise export)."""

    def __init__(self, staged: list[StagedKV]) -> None:
        super().__init__()
        self.staged = {s.header.request_id: s for s in staged}

    async def checkout(self, request_id, ticket=None):
        from disagg_runtime.kv import KVNotFound

        if request_id not in self.staged:
            raise KVNotFound(f"no KV staged for {request_id}")
        s = self.staged[request_id]

        async def release(ok):
            self.released.append((request_id, ok))

        return KVLease(s.header, s, release)


class _Landed(TcpKVChannel):
    """Receiver that reports how many layers have landed."""

    def __init__(self, *args, landed: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.landed = landed

    async def _land(self, out, offset, msg):
        await super()._land(out, offset, msg)
        self.landed.append(msg["start"] + msg["count"])


async def test_a_waiting_pull_ships_layers_as_the_forward_stages_them():
    p = make_payload("r", layers=5, tokens=33)
    staged = StagedKV(p.header, "cpu")
    landed: list[int] = []
    srv, cli = await stream_pair()
    sender, receiver = TcpKVChannel(srv, codec=RawCodec()), _Landed(cli, codec=RawCodec(), landed=landed)
    loop = asyncio.get_running_loop()

    def forward():  # the engine thread: layer i+1 is only computed after layer i reached the receiver
        for i in range(5):
            if i:
                deadline = loop.time() + 5
                while (not landed or landed[-1] < i) and loop.time() < deadline:
                    threading.Event().wait(0.002)
            staged.stage(i, p.keys[i], p.values[i])
            staged.mark_ready(i + 1)

    producer = threading.Thread(target=forward)
    producer.start()
    (got, rstats), sstats = await asyncio.gather(receiver.recv(), sender.send(p.header, staged))
    producer.join()
    assert_bit_exact(got, p)
    assert landed == [1, 2, 3, 4, 5] and sstats.batches == 5 and rstats.layers == 5
    await sender.close()
    await receiver.close()


async def test_a_forward_that_fails_mid_staging_fails_the_waiting_pull_with_its_reason():
    p = make_payload("r", layers=4)
    staged = StagedKV(p.header, "cpu")
    staged.stage(0, p.keys[0], p.values[0])
    staged.mark_ready(1)
    source = StagedSource([staged])
    server = KVServer(source, local=HERE, host="127.0.0.1", timeout=5.0)
    await server.start()
    puller = KVPuller(local=HERE, timeout=5.0)
    try:
        pull = asyncio.create_task(puller.pull(KVAddress("127.0.0.1", server.port), "r"))
        await asyncio.sleep(0.05)
        assert not pull.done()  # waiting for layer 1
        threading.Thread(target=staged.fail, args=(RuntimeError("CUDA error: an illegal memory access"),)).start()
        with pytest.raises(KVChannelError, match="illegal memory access"):
            await asyncio.wait_for(pull, 5)
    finally:
        await puller.close()
        await server.close()
    assert source.released == [("r", False)]  # nothing freed: the transfer failed


@pytest.mark.parametrize("channel", ["tcp", "nccl"])
async def test_pulls_reconnect_to_a_restarted_peer_on_the_same_address(channel):
    first, second = make_payload("a", seed=1), make_payload("b", seed=2)
    server = KVServer(StagedSource([StagedKV.of(first)]), local=HERE, host="127.0.0.1", timeout=5.0)
    port = await server.start()
    stats = []
    puller = KVPuller(local=HERE, channel=channel, timeout=5.0, on_transfer=stats.append)
    addr = KVAddress("127.0.0.1", port)
    try:
        assert_bit_exact(await puller.pull(addr, "a"), first)
        await server.close()  # the prefill worker dies; the puller still holds its link
        with pytest.raises(KVChannelError):
            await puller.pull(addr, "b")  # nobody listens: a clear error, no hang
        server = KVServer(StagedSource([StagedKV.of(second)]), local=HERE, host="127.0.0.1", port=port,
                          timeout=5.0)
        await server.start()
        assert_bit_exact(await puller.pull(addr, "b"), second)
        assert_bit_exact(await puller.pull(addr, "b"), second)  # and the new link is kept
    finally:
        await puller.close()
        await server.close()
    assert [s.request_id for s in stats] == ["a", "b", "b"]


async def test_a_stale_link_is_retried_once_on_a_fresh_connection():
    p = make_payload("r")
    server = KVServer(StagedSource([StagedKV.of(p)]), local=HERE, host="127.0.0.1", timeout=5.0)
    port = await server.start()
    puller = KVPuller(local=HERE, timeout=5.0)
    addr = KVAddress("127.0.0.1", port)
    try:
        await puller.pull(addr, "r")
        # The server drops the idle link (as a restarted one would have) but keeps serving.
        for task in list(server._links):
            task.cancel()
        await asyncio.sleep(0.05)
        assert_bit_exact(await puller.pull(addr, "r"), p)
    finally:
        await puller.close()
        await server.close()


async def test_ipc_maps_the_staging_buffer_once_per_link_and_frees_it_on_close(file_system_sharing):
    srv, cli = await stream_pair()
    sender, receiver = CudaIpcKVChannel(srv, codec=RawCodec()), CudaIpcKVChannel(cli, codec=RawCodec())
    maps = 0
    real_map = receiver._map

    async def counted():
        nonlocal maps
        maps += 1
        await real_map()

    receiver._map = counted
    small = [make_payload(f"s{i}", tokens=16, seed=i) for i in range(3)]
    big = make_payload("big", tokens=9000, layers=4, heads=4, dim=16)  # 4.4 MiB: outgrows the first buffer
    for p in [*small, big, small[0]]:
        (got, _), _ = await asyncio.gather(receiver.recv(), sender.send(p.header, StagedKV.of(p)))
        assert_bit_exact(got, p)
    assert maps == 2  # the first pull, and once when the staging buffer had to grow
    assert sender.staging_bytes >= big.header.nbytes and receiver.staging_bytes == sender.staging_bytes
    await sender.close()
    await receiver.close()
    assert sender.staging_bytes == 0 and receiver.staging_bytes == 0


async def test_fp8_staged_kv_goes_out_as_one_batch_within_the_codec_error():
    p = make_payload("r", tokens=50, heads=4, dim=32, layers=6, dtype="bfloat16")
    server = KVServer(StagedSource([StagedKV.of(p)]), local=HERE, host="127.0.0.1", timeout=5.0)
    await server.start()
    stats = []
    puller = KVPuller(local=HERE, codec="fp8", timeout=5.0, on_transfer=stats.append)
    try:
        got = await puller.pull(KVAddress("127.0.0.1", server.port), "r")
    finally:
        await puller.close()
        await server.close()
    assert got.header == p.header and stats[0].batches == 1 and stats[0].codec == "fp8"
    for a, b in zip(got.keys + got.values, p.keys + p.values, strict=True):
        assert (a.float() - b.float()).abs().max() <= b.float().abs().max() / 8


async def test_the_ack_of_a_pull_reaches_the_server_even_when_the_puller_closes_at_once():
    # The puller posts its ack instead of awaiting the write; a close right after the pull must still send
    # it, or the prefill end would count the pull as failed and keep the KV parked.
    source = DictSource([make_payload("r1"), make_payload("r2")])
    server = KVServer(source, local=HERE, host="127.0.0.1", timeout=5.0)
    port = await server.start()
    try:
        puller = KVPuller(local=HERE, timeout=5.0)
        await puller.pull(KVAddress("127.0.0.1", port), "r1")
        await puller.pull(KVAddress("127.0.0.1", port), "r2")  # r1's ack leaves with this request
        await puller.close()
        for _ in range(100):
            if len(source.released) == 2:
                break
            await asyncio.sleep(0.02)
        assert source.released == [("r1", True), ("r2", True)]
    finally:
        await server.close()
