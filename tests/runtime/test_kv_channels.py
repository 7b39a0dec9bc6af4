"""KV channels end to end over loopback: TCP and the collective (gloo) path, errors and timeouts."""

from __future__ import annotations

import asyncio

import pytest
import torch
from disagg_runtime.kv import (
    Endpoint,
    KVAddress,
    KVMismatchError,
    KVNotFound,
    KVPuller,
    KVServer,
    KVTimeout,
    payload_layers,
)
from disagg_runtime.kv.channel import KVChannel
from disagg_runtime.kv.codec import RawCodec
from disagg_runtime.kv.tcp import TcpKVChannel
from disagg_runtime.kv.testing import DictSource, make_payload, stream_pair

HERE = Endpoint(node="node-a")


def assert_bit_exact(got, want) -> None:
    assert got.header == want.header
    for a, b in zip(got.keys + got.values, want.keys + want.values, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


async def serve(source, **kw) -> KVServer:
    server = KVServer(source, local=HERE, host="127.0.0.1", timeout=kw.pop("timeout", 5.0), **kw)
    await server.start()
    return server


@pytest.mark.parametrize("channel", ["tcp", "nccl"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
async def test_round_trip_is_bit_exact(channel, dtype):
    payloads = [make_payload(f"r{i}", dtype=dtype, seed=i, tokens=5 + 31 * i) for i in range(3)]
    source = DictSource(payloads)
    sent, received = [], []
    server = await serve(source, on_transfer=sent.append)
    puller = KVPuller(local=HERE, channel=channel, timeout=5.0, on_transfer=received.append)
    try:
        for p in payloads:
            got = await puller.pull(KVAddress("127.0.0.1", server.port), p.header.request_id)
            assert_bit_exact(got, p)
    finally:
        await puller.close()
        await server.close()
    # One link carried every pull; the sender freed each payload after its ack.
    assert [s.channel for s in received] == [channel] * 3
    assert [r for r, ok in source.released if ok] == ["r0", "r1", "r2"] and not source.parked
    assert [s.wire_bytes for s in received] == [p.header.nbytes for p in payloads]
    assert [s.request_id for s in sent] == ["r0", "r1", "r2"]


async def test_unknown_request_is_not_found_and_link_survives():
    p = make_payload("present")
    server = await serve(DictSource([p]))
    puller = KVPuller(local=HERE, timeout=5.0)
    addr = KVAddress("127.0.0.1", server.port)
    try:
        with pytest.raises(KVNotFound, match="missing"):
            await puller.pull(addr, "missing")
        assert_bit_exact(await puller.pull(addr, "present"), p)
    finally:
        await puller.close()
        await server.close()


async def test_receiver_rejects_kv_for_another_model():
    p = make_payload("r", model_id="model-a")
    source = DictSource([p])
    server = await serve(source)
    puller = KVPuller(local=HERE, timeout=5.0)

    def expect(header):
        if header.model_id != "model-b":
            raise KVMismatchError(f"KV for {header.model_id}, engine serves model-b")

    try:
        with pytest.raises(KVMismatchError, match="model-a"):
            await puller.pull(KVAddress("127.0.0.1", server.port), "r", expect=expect)
        await asyncio.sleep(0.05)
    finally:
        await puller.close()
        await server.close()
    # The sender was told and kept the KV parked: a failed transfer frees nothing.
    assert source.released == [("r", False)] and "r" in source.parked


async def test_tensors_that_contradict_the_header_are_rejected_on_arrival():
    good = make_payload("r", tokens=8)
    wrong = make_payload("r", tokens=9)  # header says 8 tokens, layers carry 9
    srv_stream, cli_stream = await stream_pair()
    sender = TcpKVChannel(srv_stream, codec=RawCodec())
    receiver = TcpKVChannel(cli_stream, codec=RawCodec())
    send = asyncio.create_task(sender.send(good.header, payload_layers(wrong)))
    with pytest.raises(KVMismatchError, match="do not match the header"):
        await receiver.recv()
    with pytest.raises(KVMismatchError):
        await send
    assert receiver.broken and sender.broken
    await sender.close()
    await receiver.close()


async def test_silent_peer_times_out():
    async def mute(reader, writer):
        await asyncio.sleep(10)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    puller = KVPuller(local=HERE, timeout=0.3)
    try:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(KVTimeout):
            await puller.pull(KVAddress("127.0.0.1", server.sockets[0].getsockname()[1]), "r")
        assert asyncio.get_running_loop().time() - t0 < 3
    finally:
        await puller.close()
        server.close()


class _ObservedTcp(TcpKVChannel):
    """Receiver that reports each layer it finished reading."""

    def __init__(self, *args, arrived: list[asyncio.Event], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrived = arrived
        self.count = 0

    async def _land(self, out, offset, msg):
        await super()._land(out, offset, msg)
        for _ in range(msg["count"]):
            self.arrived[self.count].set()
            self.count += 1


async def test_layers_travel_while_later_layers_are_still_being_produced():
    p = make_payload("r", layers=4)
    arrived = [asyncio.Event() for _ in range(4)]

    async def producer():
        # Layer i+1 is only "computed" after layer i reached the receiver: a sender that buffered the
        # whole payload before sending would deadlock here.
        for i, (k, v) in enumerate(zip(p.keys, p.values, strict=True)):
            if i:
                await asyncio.wait_for(arrived[i - 1].wait(), 5)
            yield k, v

    srv_stream, cli_stream = await stream_pair()
    sender: KVChannel = TcpKVChannel(srv_stream, codec=RawCodec())
    receiver = _ObservedTcp(cli_stream, codec=RawCodec(), arrived=arrived)
    (got, _), stats = await asyncio.gather(receiver.recv(), sender.send(p.header, producer()))
    assert_bit_exact(got, p)
    assert stats.layers == 4
    await sender.close()
    await receiver.close()


async def test_fp8_link_halves_the_bytes():
    p = make_payload("r", tokens=64, heads=4, dim=32, dtype="bfloat16")
    server = await serve(DictSource([p]))
    stats = []
    puller = KVPuller(local=HERE, codec="fp8", timeout=5.0, on_transfer=stats.append)
    try:
        got = await puller.pull(KVAddress("127.0.0.1", server.port), "r")
    finally:
        await puller.close()
        await server.close()
    assert got.header == p.header and got.keys[0].dtype == torch.bfloat16
    for a, b in zip(got.keys, p.keys, strict=True):
        assert (a.float() - b.float()).abs().max() <= b.float().abs().max() / 8
    assert stats[0].codec == "fp8"
    assert stats[0].wire_bytes < 0.6 * p.header.nbytes
