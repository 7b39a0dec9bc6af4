"""Staging arenas: a prefill engine's staged KV lives in a few large buffers that a decode end maps once.

A decode worker on the same node as its prefill worker reads a request's staged KV straight out of the
prefill's memory (a direct read, kv/puller.py): the prefill's answer to the router names the arena and
the byte offset, and the decode end, which mapped the arena over its IPC link the first time it saw it,
copies the bytes with no round trip to the prefill. That needs the staging buffers to sit in memory
mapped once, not in one allocation per request (opening an IPC handle costs milliseconds).

An arena is one uint8 buffer with a first-fit allocator of ALIGN-aligned byte ranges. The pool opens a
new, larger arena (a new id) when the current one is full, within a byte budget, and lets an arena go
once nothing is allocated in it and a newer one exists: a decode end that still maps it keeps the memory
until it drops the mapping. Ids are random, so a restarted prefill worker never reuses one.

Only the thread that stages KV (the engine thread) allocates and frees.
"""

from __future__ import annotations

import bisect
import secrets
from dataclasses import dataclass

import torch
import torch.multiprocessing as torch_mp

from .staged import ALIGN

# The first arena holds at least this much (a few requests of a small model), unless the budget is smaller.
MIN_ARENA_BYTES = 16 << 20


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class StagingArena:
    """One buffer, sub-allocated in aligned byte ranges (first fit, neighbours merged on free)."""

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        self.id = secrets.token_hex(8)
        self.capacity = _aligned(capacity)
        self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=torch.device(device))
        if self.buffer.device.type == "cpu" and torch_mp.get_sharing_strategy() == "file_system":
            # Shared now, before any write: sharing a CPU tensor later moves it into shared memory, and
            # writes the engine thread makes meanwhile would land in the memory being left.
            self.buffer.share_memory_()
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}  # offset -> size

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def empty(self) -> bool:
        return not self._used

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free range of `nbytes` (rounded up to ALIGN), or None if none is large enough."""
        size = _aligned(max(nbytes, 1))
        for i, (offset, room) in enumerate(self._free):
            if room >= size:
                if room == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, room - size)
                self._used[offset] = size
                return offset
        return None

    def free(self, offset: int) -> None:
        """Give back the range allocated at `offset`."""
        size = self._used.pop(offset)
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # Merge with the next range, then with the previous one.
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the buffer."""
        return self.buffer[offset:offset + nbytes]


@dataclass(frozen=True)
class ArenaRange:
    """Where one staging sits: which arena, which bytes."""

    arena: StagingArena
    offset: int
    nbytes: int

    @property
    def tensor(self) -> torch.Tensor:
        return self.arena.view(self.offset, self.nbytes)


class ArenaPool:
    """The arenas of one engine: allocates staging ranges within `budget_bytes` of arena memory."""

    def __init__(self, device: torch.device | str, budget_bytes: int) -> None:
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self._arenas: dict[str, StagingArena] = {}
        self._current: StagingArena | None = None

    @property
    def reserved_bytes(self) -> int:
        """Memory held by the live arenas (allocated or not)."""
        return sum(a.capacity for a in self._arenas.values())

    def get(self, arena_id: str) -> StagingArena | None:
        """The live arena with this id (None once it has been let go, or if it never was)."""
        return self._arenas.get(arena_id)

    def buffer(self, arena_id: str) -> torch.Tensor | None:
        """The whole buffer of a live arena, for a decode end to map (what a KV source's `arena` answers)."""
        arena = self._arenas.get(arena_id)
        return None if arena is None else arena.buffer

    def alloc(self, nbytes: int) -> ArenaRange | None:
        """A range of `nbytes` in the current arena, or in a new larger one; None when over the budget."""
        if self._current is not None:
            offset = self._current.alloc(nbytes)
            if offset is not None:
                return ArenaRange(self._current, offset, nbytes)
        grown = self._open(nbytes)
        if grown is None:
            return None
        offset = grown.alloc(nbytes)
        return None if offset is None else ArenaRange(grown, offset, nbytes)

    def _open(self, nbytes: int) -> StagingArena | None:
        if self._current is not None and self._current.empty:
            del self._arenas[self._current.id]  # too small for this one: a bigger one replaces it
        self._drop_idle()
        previous = self._current.capacity if self._current is not None else 0
        size = max(MIN_ARENA_BYTES, 2 * previous, _aligned(nbytes))
        size = 1 << (size - 1).bit_length()
        room = self.budget_bytes - self.reserved_bytes
        size = min(size, room)
        if size < _aligned(nbytes):
            return None
        arena = self._current = StagingArena(size, self.device)
        self._arenas[arena.id] = arena
        return arena

    def free(self, where: ArenaRange) -> None:
        """Give back a range; an emptied arena that is not the current one is let go."""
        where.arena.free(where.offset)
        self._drop_idle()

    def _drop_idle(self) -> None:
        for arena_id, arena in list(self._arenas.items()):
            if arena.empty and arena is not self._current:
                del self._arenas[arena_id]
