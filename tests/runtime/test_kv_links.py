"""Channel choice per prefill-decode pair, and the IPC data plane (CPU shared memory here, CUDA on a GPU)."""

from __future__ import annotations

import subprocess
import sys
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
    import asyncio, sys, torch, torch.multiprocessing as mp
    from disagg_runtime.kv import Endpoint, KVLease, KVServer, StagedKV
    from disagg_runtime.kv.testing import DictSource, make_payload
    device, staged = sys.argv[1], sys.argv[2] == "staged"

    class Staged(DictSource):
        # What the prefill worker ships: KV staged by the forward (engine/kv_export.py).
        async def checkout(self, rid, ticket=None):
            lease = await super().checkout(rid, ticket)
            return KVLease(lease.header, StagedKV.of(self.parked[rid]), lease.release)

    if device == "cpu":
        mp.set_sharing_strategy("file_system")
    async def main():
        payloads = [make_payload(f"r{i}", seed=i, tokens=20 + i) for i in range(3)]
        for p in payloads:
            p.keys = [k.to(device) for k in p.keys]
            p.values = [v.to(device) for v in p.values]
        server = KVServer((Staged if staged else DictSource)(payloads), local=Endpoint("node-x", None if device == "cpu" else "g"),
                          device=device, host="127.0.0.1", timeout=10)
        print(await server.start(), flush=True)
        await asyncio.sleep(60)
    asyncio.run(main())
    """
)


async def _pull_over_ipc(device: str, source: str = "stream") -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, device, source], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        stats = []
        local = Endpoint("node-x", None if device == "cpu" else "g")
        puller = KVPuller(local=local, device=device, channel="ipc", timeout=10, on_transfer=stats.append)
        try:
            for i in range(3):
                got = await puller.pull(KVAddress("127.0.0.1", port), f"r{i}")
                want = make_payload(f"r{i}", seed=i, tokens=20 + i)
                assert got.header == want.header
                for a, b in zip(got.keys + got.values, want.keys + want.values, strict=True):
                    assert a.device.type == device
                    assert torch.equal(a.cpu(), b)
        finally:
            await puller.close()
        return [s.channel for s in stats]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("source", ["stream", "staged"])
async def test_ipc_data_plane_on_cpu_shared_memory(source):
    assert await _pull_over_ipc("cpu", source) == ["ipc"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["stream", "staged"])
async def test_cuda_ipc_round_trip_is_bit_exact(source):
    # Three pulls of different payloads over one link: the staging buffer is reused, so a receiver that
    # copied before the sender's copy finished (no event wait) would see the previous payload's bytes.
    assert await _pull_over_ipc("cuda", source) == ["ipc"] * 3
