"""Channel choice per prefill-decode pair, and the IPC data plane (CPU shared memory here, CUDA on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from disagg_runtime.kv import Endpoint, KVAddress, KVChannelError, KVPuller, choose_channel
from disagg_runtime.kv.testing import make_payload

CPU_A, CPU_B = Endpoint("a"), Endpoint("b")
GPU_A0, GPU_A1, GPU_B0 = Endpoint("a", "gpu-0"), Endpoint("a", "gpu-1"), Endpoint("b", "gpu-2")


@pytest.mark.parametrize(
    ("local", "remote", "override", "want"),
    [
        (GPU_A0, GPU_A0, "auto", "ipc"),  # same GPU
        (GPU_A0, GPU_A1, "auto", "ipc"),  # same node
        (GPU_A0, GPU_B0, "auto", "nccl"),  # GPUs on different nodes
        (CPU_A, CPU_A, "auto", "tcp"),
        (CPU_A, GPU_B0, "auto", "tcp"),
        (GPU_A0, GPU_B0, "tcp", "tcp"),  # spec.runtime.kvChannel wins
        (CPU_A, CPU_B, "nccl", "nccl"),
        (CPU_A, CPU_A, "ipc", "ipc"),
    ],
)
def test_choose_channel(local, remote, override, want):
    assert choose_channel(local, remote, override) == want


def test_ipc_across_nodes_is_refused_with_advice():
    with pytest.raises(KVChannelError, match="one node.*Use auto, nccl or tcp"):
        choose_channel(GPU_A0, GPU_B0, "ipc")


# A prefill-side KV server in another process (IPC needs two processes), parking payloads r0..r2
# made from fixed seeds so this process can rebuild the expected tensors.
SERVER = textwrap.dedent(
    """
    import asyncio, json, sys, torch, torch.multiprocessing as mp
    from disagg_runtime.kv import Endpoint, KVLease, KVServer, StagedKV
    from disagg_runtime.kv.arena import ArenaPool
    from disagg_runtime.kv.testing import DictSource, make_payload, stage_in_arena
    device = sys.argv[1]

    class Staged(DictSource):
        # What the prefill worker ships: KV staged by the forward (engine/kv_export.py).
        async def checkout(self, rid, ticket=None):
            lease = await super().checkout(rid, ticket)
            return KVLease(lease.header, StagedKV.of(self.parked[rid]), lease.release)

    class InArena(DictSource):
        # Staged in a staging arena (kv/arena.py), as a prefill engine stages: direct reads map it.
        def __init__(self, payloads):
            super().__init__(payloads)
            self.pool, self.where = ArenaPool(device, 1 << 30), {}
            for p in payloads:
                _, where = stage_in_arena(self.pool, p)
                self.where[p.header.request_id] = (where.arena.id, where.offset)
            if device != "cpu":
                torch.cuda.synchronize()  # staged before anyone is told where
        def arena(self, arena_id):
            return self.pool.buffer(arena_id)
        async def release_pulled(self, rid, ticket=None):
            self.on_release(rid)

    if device == "cpu":
        mp.set_sharing_strategy("file_system")
    async def main():
        payloads = [make_payload(f"r{i}", seed=i, tokens=20 + i) for i in range(3)]
        for p in payloads:
            p.keys = [k.to(device) for k in p.keys]
            p.values = [v.to(device) for v in p.values]
        served, enough = [], asyncio.Event()
        exit_after = int(sys.argv[3]) if len(sys.argv) > 3 else None

        def transferred(what):
            served.append(what)
            if len(served) == exit_after:
                enough.set()

        kind = {"stream": DictSource, "staged": Staged, "arena": InArena}[sys.argv[2]]
        source = kind(payloads)
        source.on_release = transferred  # a direct read sends nothing: its release is what the server sees
        server = KVServer(source, local=Endpoint("node-x", None if device == "cpu" else "g"),
                          device=device, host="127.0.0.1", timeout=10, on_transfer=transferred)
        print(await server.start(), json.dumps(getattr(source, "where", {})), flush=True)
        # With an exit count: return with the links, their staging and the payloads still alive, so the
        # interpreter's teardown frees them (what a worker process does when it exits).
        await asyncio.wait_for(enough.wait(), 60) if exit_after else await asyncio.sleep(60)
    asyncio.run(main())
    """
)


async def _pull_over_ipc(device: str, source: str = "stream", *, server_exits: bool = False) -> list[str]:
    argv = [sys.executable, "-c", SERVER, device, source] + (["3"] if server_exits else [])
    # A file, not a pipe: torch's shared-memory manager (CPU sharing) outlives the server holding its stderr.
    errors = tempfile.TemporaryFile("w+") if server_exits else None
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        port_text, where_text = proc.stdout.readline().split(" ", 1)
        port, where = int(port_text), json.loads(where_text)
        stats = []
        local = Endpoint("node-x", None if device == "cpu" else "g")
        puller = KVPuller(local=local, device=device, channel="ipc", timeout=10, on_transfer=stats.append)
        try:
            for i in range(3):
                want = make_payload(f"r{i}", seed=i, tokens=20 + i)
                if source == "arena":  # read straight out of the server's arena, then released as a worker does
                    got, read = await puller.read_direct(KVAddress("127.0.0.1", port), want.header, *where[f"r{i}"])
                    await puller.release(KVAddress("127.0.0.1", port), f"r{i}")
                    stats.append(read)
                else:
                    got = await puller.pull(KVAddress("127.0.0.1", port), f"r{i}")
                assert got.header == want.header
                for a, b in zip(got.keys + got.values, want.keys + want.values, strict=True):
                    assert a.device.type == device
                    assert torch.equal(a.cpu(), b)
        finally:
            await puller.close()
        if server_exits:
            proc.wait(timeout=60)
            errors.seek(0)
            err = errors.read()
            assert proc.returncode == 0, err
            assert "terminate called" not in err and "CUDA error" not in err, err
        return [s.channel for s in stats]
    finally:
        proc.kill()
        proc.wait()
        if errors is not None:
            errors.close()


@pytest.mark.parametrize("source", ["stream", "staged", "arena"])
async def test_ipc_data_plane_on_cpu_shared_memory(source):
    assert await _pull_over_ipc("cpu", source) == ["ipc"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["stream", "staged", "arena"])
async def test_cuda_ipc_round_trip_is_bit_exact(source):
    # Three pulls of different payloads over one link: the staging buffer is reused, so a receiver that
    # copied before the sender's copy finished (no event wait) would see the previous payload's bytes.
    assert await _pull_over_ipc("cuda", source) == ["ipc"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_a_kv_server_process_that_served_cuda_ipc_pulls_exits_cleanly():
    # Its staging buffers and the staged payloads are freed at interpreter exit, after the CUDA driver
    # began unloading: a buffer handed to the allocator with record_stream made that abort the process.
    assert await _pull_over_ipc("cuda", "staged", server_exits=True) == ["ipc"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_a_kv_server_process_whose_arena_was_read_directly_exits_cleanly():
    assert await _pull_over_ipc("cuda", "arena", server_exits=True) == ["ipc"] * 3


async def test_a_kv_server_process_that_served_ipc_pulls_exits_cleanly_on_cpu():
    assert await _pull_over_ipc("cpu", "staged", server_exits=True) == ["ipc"] * 3
