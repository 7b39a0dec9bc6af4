"""Direct reads of staged KV: the arena allocator, one mapping per arena and link, bytes equal to a pull,
a release that proves the read, and a fallback to pulling whenever a direct read cannot be made.

On CPU the IPC plane shares memory by name (torch's file_system strategy), the same code path as CUDA IPC.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import torch
from disagg_runtime.kv import (
    DirectReadUnavailable,
    Endpoint,
    KVAddress,
    KVLease,
    KVNotFound,
    KVPuller,
    KVServer,
    StagedKV,
)
from disagg_runtime.kv.arena import MIN_ARENA_BYTES, ArenaPool, StagingArena
from disagg_runtime.kv.testing import make_payload, stage_in_arena

HERE = Endpoint(node="node-a")


def assert_bit_exact(got, want) -> None:
    assert got.header == want.header
    for a, b in zip(got.keys + got.values, want.keys + want.values, strict=True):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---- the allocator ---------------------------------------------------------------------------------
def test_an_arena_reuses_freed_ranges_and_merges_neighbours():
    arena = StagingArena(1024, "cpu")
    a, b, c = arena.alloc(100), arena.alloc(200), arena.alloc(300)
    assert (a, b, c) == (0, 112, 320)  # each range starts on a 16-byte boundary
    assert arena.alloc(1024) is None
    arena.free(b)
    assert arena.alloc(150) == 112  # first fit, in the hole b left
    arena.free(112)
    arena.free(a)
    arena.free(c)
    assert arena.empty and arena.alloc(1024) == 0  # every hole merged back into one range


def test_the_pool_opens_larger_arenas_within_its_budget_and_lets_empty_old_ones_go():
    budget = 4 * MIN_ARENA_BYTES
    pool = ArenaPool("cpu", budget)
    first = pool.alloc(MIN_ARENA_BYTES // 2)
    assert first.arena.capacity == MIN_ARENA_BYTES
    second = pool.alloc(MIN_ARENA_BYTES)  # no room left in the first: a new, larger arena
    assert second.arena is not first.arena and second.arena.capacity == 2 * MIN_ARENA_BYTES
    assert pool.alloc(budget) is None  # over the budget: the caller stages nothing (it gathers on a pull)
    old = first.arena.id
    pool.free(first)
    assert pool.get(old) is None and pool.get(second.arena.id) is second.arena
    assert pool.reserved_bytes == 2 * MIN_ARENA_BYTES


# ---- reads over a link -----------------------------------------------------------------------------
class ArenaSource:
    """A prefill engine's staged KV in a staging arena, freed by a release (what the prefill worker does)."""

    def __init__(self) -> None:
        self.pool = ArenaPool("cpu", 8 * MIN_ARENA_BYTES)
        self.staged: dict[str, tuple[StagedKV, object]] = {}

    def stage(self, payload) -> tuple[str, int]:
        staged, where = stage_in_arena(self.pool, payload)
        self.staged[payload.header.request_id] = (staged, where)
        return where.arena.id, where.offset

    async def checkout(self, request_id, ticket=None):
        if request_id not in self.staged:
            raise KVNotFound(f"no KV staged for {request_id}")
        staged = self.staged[request_id][0]

        async def release(ok):
            if ok:
                self.free(request_id)

        return KVLease(staged.header, staged, release)

    async def release_pulled(self, request_id, ticket=None):
        if request_id not in self.staged:
            raise KVNotFound(f"no KV staged for {request_id}")
        self.free(request_id)

    def free(self, request_id: str) -> None:
        self.pool.free(self.staged.pop(request_id)[1])

    def arena(self, arena_id):
        return self.pool.buffer(arena_id)


@asynccontextmanager
async def linked(channel: str = "ipc"):
    """A KV server over an ArenaSource, and a puller with `channel` links to it: (source, puller, address)."""
    source = ArenaSource()
    server = KVServer(source, local=HERE, host="127.0.0.1", timeout=5.0)
    await server.start()
    puller = KVPuller(local=HERE, channel=channel, timeout=5.0)
    try:
        yield source, puller, KVAddress("127.0.0.1", server.port)
    finally:
        await puller.close()
        await server.close()


async def test_a_direct_read_equals_the_staged_kv_and_maps_each_arena_once(file_system_sharing):
    async with linked() as (source, puller, addr):
        payloads = [make_payload(f"r{i}", tokens=20 + 7 * i, layers=3, heads=2, dim=8, seed=i) for i in range(4)]
        for p in payloads:
            arena, offset = source.stage(p)
            got, stats = await puller.read_direct(addr, p.header, arena, offset)
            assert_bit_exact(got, p)
            assert stats.channel == "ipc" and stats.raw_bytes == p.header.nbytes and stats.direct
            await puller.release(addr, p.header.request_id)
        channel = puller._links[addr].channel
        assert list(channel._arenas) == [arena]  # one arena, mapped by the first read only
        assert source.staged == {}  # every release freed its range


async def test_a_released_range_reused_by_another_request_fails_the_late_reads_release(file_system_sharing):
    async with linked() as (source, puller, addr):
        first = make_payload("old", tokens=16, layers=2, heads=2, dim=8, seed=1)
        arena, offset = source.stage(first)
        source.free("old")  # expired on the prefill side before the decode end got to it
        second = make_payload("new", tokens=16, layers=2, heads=2, dim=8, seed=2)
        assert source.stage(second) == (arena, offset)  # the same bytes now hold another request's KV
        got, _ = await puller.read_direct(addr, first.header, arena, offset)
        assert not torch.equal(got.keys[0], first.keys[0])  # what a late read sees: not its KV
        with pytest.raises(KVNotFound):  # and its release says so, which is what the decode worker checks
            await puller.release(addr, "old")
        assert "new" in source.staged  # the other request's KV is untouched


async def test_a_direct_read_that_cannot_be_made_leaves_the_link_usable_for_a_pull(file_system_sharing):
    async with linked() as (source, puller, addr):
        p = make_payload("r", tokens=24, layers=3, heads=2, dim=8)
        arena, offset = source.stage(p)
        with pytest.raises(DirectReadUnavailable, match="no staging arena"):
            await puller.read_direct(addr, p.header, "00ff00ff00ff00ff", offset)
        with pytest.raises(DirectReadUnavailable, match="outside"):
            await puller.read_direct(addr, p.header, arena, source.pool.get(arena).capacity - 16)
        assert_bit_exact(await puller.pull(addr, "r"), p)  # the same link, still in step


async def test_a_tcp_link_pulls_instead(file_system_sharing):
    async with linked("tcp") as (source, puller, addr):
        p = make_payload("r", tokens=24, layers=3, heads=2, dim=8)
        arena, offset = source.stage(p)
        with pytest.raises(DirectReadUnavailable, match="tcp"):
            await puller.read_direct(addr, p.header, arena, offset)
        assert_bit_exact(await puller.pull(addr, "r"), p)
