"""Layer-wise KV export: a prefill-only request's prompt KV is staged while its prefill forward runs.

A prefill worker's requests are never decoded where they are prefilled: their KV is exported and
released. Instead of gathering every layer's blocks when a decode worker pulls (on the engine thread,
behind whatever step runs then), the forward copies each layer's prompt KV into the request's staging
(kv/staged.py, already in the wire layout) as soon as that layer stored it, and marks the layer ready.
At the end of prefill the payload is complete; a pull that is already waiting ships layers as they
come. The copy is the same gather `PagedKVCache.read` does, so the bytes are identical.

Staging is extra device memory next to the paged cache, so it is bounded (`budget_bytes`): a request
that does not fit is exported the old way, by `gather`, when it is pulled. Stagings are ranges of a few
large arenas (kv/arena.py), so a decode end on the same node maps an arena once and then reads each
request's KV straight out of it (a direct read, `location`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kv.arena import ArenaPool, ArenaRange
from ..kv.payload import KVHeader, KVPayload
from ..kv.staged import StagedKV, staged_nbytes

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence as Seq

# Staging may take this share of the device memory left free after the cache and the weights ...
_FREE_SHARE = 0.5
# ... and at most this much (on CPU: this much).
MAX_STAGING_BYTES = 4 << 30

LayerHook = Callable[[int], None]


@dataclass
class _Staging:
    staged: StagedKV
    slots: torch.Tensor  # the request's cache slots, token order


class KVExporter:
    """The staged prompt KV of one engine's prefill-only requests, by request id."""

    def __init__(self, engine: Engine, *, budget_bytes: int | None = None) -> None:
        self.engine = engine
        self.budget_bytes = budget_bytes  # None: decided at the first staging, once the cache is allocated
        self._staged: dict[str, StagedKV] = {}
        self._where: dict[str, ArenaRange] = {}
        self._pool: ArenaPool | None = None
        self._pass: list[_Staging] = []

    @property
    def staged_bytes(self) -> int:
        """Device memory held by staged requests."""
        return sum(s.nbytes for s in self._staged.values())

    def get(self, request_id: str) -> StagedKV | None:
        """The request's staging (complete, or being filled by a running forward), or None."""
        return self._staged.get(request_id)

    def location(self, request_id: str) -> tuple[str, int] | None:
        """(arena id, byte offset) of the request's staging once it is complete and written on the device
        (what a direct read needs), else None."""
        staged, where = self._staged.get(request_id), self._where.get(request_id)
        if staged is None or where is None or not staged.complete:
            return None
        event = staged.event(staged.header.num_layers)
        if event is not None and not event.query():
            return None  # copies still queued: a pull, which waits on the event, is the safe way
        return where.arena.id, where.offset

    def arena(self, arena_id: str) -> torch.Tensor | None:
        """The whole buffer of a live arena, for a decode end to map (None if there is no such arena)."""
        return None if self._pool is None else self._pool.buffer(arena_id)

    def drop(self, request_id: str) -> None:
        """Free the request's staging (it was pulled, aborted or expired)."""
        self._staged.pop(request_id, None)
        where = self._where.pop(request_id, None)
        if where is not None and self._pool is not None:
            self._pool.free(where)

    def header(self, request_id: str, num_tokens: int) -> KVHeader:
        e = self.engine
        return KVHeader(request_id=request_id, model_id=e.model_id, num_layers=e.num_layers,
                        num_kv_heads=e.num_kv_heads, head_dim=e.head_dim, dtype=e.dtype_name, num_tokens=num_tokens)

    def gather(self, block_table: Sequence[int], request_id: str, num_tokens: int) -> KVPayload:
        """The prompt KV read out of the cache blocks now (requests that were not staged)."""
        keys, values = self.engine.cache.read(block_table, num_tokens)
        return KVPayload(header=self.header(request_id, num_tokens), keys=keys, values=values)

    # ---- the prefill forward -----------------------------------------------------------------------
    @property
    def layer_hook(self) -> LayerHook | None:
        """What the forward calls after layer i stored its KV, while a staging pass runs (else None)."""
        return self._after_layer if self._pass else None

    @contextmanager
    def staging(self, seqs: Sequence[Seq]) -> Iterator[None]:
        """Stage `seqs`' prompt KV during the forward run inside this block (as many as the budget allows)."""
        self._pass = self._begin(seqs)
        fused = getattr(self.engine.gpu_runner, "fused", None)
        if fused is not None and self._pass:
            fused.after_prefill_layer = self._after_layer
        try:
            yield
        except BaseException as e:
            for s in self._pass:
                s.staged.fail(e)
                self.drop(s.staged.header.request_id)
            raise
        else:
            self._finish()
        finally:
            if fused is not None:
                fused.after_prefill_layer = None
            self._pass = []

    def _budget(self) -> int:
        if self.budget_bytes is None:
            device = self.engine.device
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                self.budget_bytes = min(MAX_STAGING_BYTES, int(free * _FREE_SHARE))
            else:
                self.budget_bytes = MAX_STAGING_BYTES
        return self.budget_bytes

    def _begin(self, seqs: Sequence[Seq]) -> list[_Staging]:
        cache = self.engine.cache
        device = cache.layers[0].keys.device
        budget = self._budget()
        if self._pool is None or (self._pool.budget_bytes != budget and not self._where):
            self._pool = ArenaPool(device, budget)  # a changed budget applies once nothing is staged
        out = []
        for seq in seqs:
            header = self.header(seq.request_id, seq.prompt_len)
            where = self._pool.alloc(staged_nbytes(header))
            if where is None:
                continue  # over the budget: exported by `gather` when pulled
            staged = StagedKV(header, device, buffer=where.tensor)
            self._where[seq.request_id] = where
            slots = torch.tensor(cache.slots(seq.block_table, 0, seq.prompt_len), dtype=torch.long, device=device)
            self._staged[seq.request_id] = staged
            out.append(_Staging(staged, slots))
        return out

    def _copy_layer(self, i: int, s: _Staging) -> None:
        cache = self.engine.cache
        layer = cache.layers[i]
        flat = (-1, cache.num_kv_heads, cache.head_dim)
        torch.index_select(layer.keys.view(flat), 0, s.slots, out=s.staged.key(i))
        torch.index_select(layer.values.view(flat), 0, s.slots, out=s.staged.value(i))

    def _after_layer(self, i: int) -> None:
        for s in self._pass:
            if s.staged.ready == i:  # in order: a forward that skipped a layer is finished by _finish
                self._copy_layer(i, s)
                s.staged.mark_ready(i + 1)

    def _finish(self) -> None:
        # Forwards without the hook (pipeline stages, a backend that bypasses the context) stage here.
        for s in self._pass:
            n = s.staged.header.num_layers
            if s.staged.ready < n:
                for i in range(s.staged.ready, n):
                    self._copy_layer(i, s)
                s.staged.mark_ready(n)
