"""On-demand KV memory of one instance, as the runtime's engine manages it, advanced in closed form.

The engine (disagg_runtime/engine/block_manager.py, preemption.py) admits a request when its prompt's
blocks fit with a watermark to spare, gives a running sequence a new block each time its context crosses
a multiple of the block size, and, when a step cannot get those blocks, preempts the latest admitted
sequence (swap to host, or drop for recompute); preempted sequences resume oldest first, before anything
new is admitted, once their blocks fit with the watermark to spare.

Every decode round adds one token to every running sequence, so a sequence admitted with `base` =
cached tokens - round number needs a block in round r exactly when (base + r) % block_size == 0. Counting
running sequences by base % block_size therefore gives the blocks each coming round needs, and the round
at which memory runs short, in O(block_size) rather than per token.

Invariant at a round boundary R, once `prepare_round` has run: every running sequence holds
blocks_for(cached + 1), the blocks round R writes into.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Callable, MutableSequence
from itertools import accumulate

from ..latency import LatencyModel
from .types import KVPolicy

_INF = 1 << 62


class BlockLedger:
    """Block counts of one instance: capacity, the watermark, blocks in use, running sequences by phase."""

    __slots__ = ("bs", "capacity", "phase", "peak", "used", "watermark")

    def __init__(self, capacity_tokens: int, policy: KVPolicy) -> None:
        self.bs = policy.block_size
        self.capacity = capacity_tokens // self.bs
        self.watermark = math.ceil(policy.watermark * self.capacity) if policy.watermark > 0 else 0
        self.used = 0
        self.peak = 0
        self.phase = [0] * self.bs  # running sequences by base % block_size

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def give(self, n: int) -> None:
        self.used -= n

    def fits_with_watermark(self, blocks: int) -> bool:
        return blocks + self.watermark <= self.free

    def need_at(self, r: int) -> int:
        """Blocks the running sequences grow into during round r."""
        return self.phase[-r % self.bs]

    def needs_from(self, r: int) -> list[int]:
        """Blocks needed in rounds r, r+1, ..., r+block_size-1 (one cycle; it sums to the running batch)."""
        s, phase = -r % self.bs, self.phase
        return phase[s::-1] + phase[:s:-1]  # need_at(r + i) = phase[(s - i) % bs]

    def growth(self, start: int, stop: int, batch: int) -> int:
        """Blocks needed over rounds [start, stop) by `batch` running sequences."""
        if stop <= start:
            return 0
        cycles, rest = divmod(stop - start, self.bs)
        return cycles * batch + (sum(self.needs_from(start)[:rest]) if rest else 0)

    def rounds_until_short(self, r: int, batch: int) -> int:
        """Fewest m >= 1 such that rounds r+1 .. r+m need more blocks than are free (huge if never)."""
        if batch == 0:
            return _INF
        free = self.capacity - self.used
        if free < 0:
            return 1
        # Every block_size-round cycle needs exactly `batch` blocks, so whole cycles fit while they last;
        # within the last one, the first round whose running total passes what is left is the short one.
        cycles, left = divmod(free, batch)
        return cycles * self.bs + bisect_right(list(accumulate(self.needs_from(r + 1))), left) + 1


class OnDemandBatch:
    """Running and preempted sequences of one instance under the engine's policy, on a `BlockLedger`.

    `preempt_cost(tokens)` and `resume_cost(tokens, swapped)` are the seconds a preemption and a resume
    of a sequence holding `tokens` tokens of KV add to the instance's step.
    """

    def __init__(self, ledger: BlockLedger, policy: KVPolicy, preempt_cost: Callable[[int], float],
                 resume_cost: Callable[[int], float]) -> None:
        self.ledger = ledger
        self.policy = policy
        self.preempt_cost = preempt_cost
        self.resume_cost = resume_cost
        self.round = 0
        self.batch = 0
        self.sum_context = 0  # attention length of this round's tokens, summed over running sequences
        self.preemptions = 0
        self.preempted_tokens = 0
        self._admissions = 0
        self._by_finish: list[tuple[int, int]] = []  # (round it finishes after, request), lazily cleaned
        self._by_newest: list[tuple[int, int]] = []  # (-admission, request), lazily cleaned
        self._waiting: list[tuple[int, int]] = []  # preempted: (admission, request)
        self._base: dict[int, int] = {}  # running request -> cached tokens - round
        self._fin: dict[int, int] = {}
        self._adm: dict[int, int] = {}
        self._parked: dict[int, tuple[int, int]] = {}  # preempted request -> (cached tokens, rounds left)

    @property
    def num_preempted(self) -> int:
        return len(self._waiting)

    def join(self, j: int, cached: int, rounds_left: int, admission: int | None = None) -> None:
        """A sequence holding KV for `cached` tokens starts decoding (its blocks are already taken)."""
        if admission is None:
            self._admissions += 1
            admission = self._admissions
        ledger = self.ledger
        base = cached - self.round
        fin = self.round + rounds_left
        self._base[j] = base
        self._fin[j] = fin
        self._adm[j] = admission
        ledger.phase[base % ledger.bs] += 1
        self.batch += 1
        self.sum_context += cached + 1
        heapq.heappush(self._by_finish, (fin, j))
        heapq.heappush(self._by_newest, (-admission, j))

    def _drop(self, j: int) -> int:
        """Remove running j; returns the tokens it has cached."""
        ledger = self.ledger
        base = self._base.pop(j)
        del self._fin[j]
        ledger.phase[base % ledger.bs] -= 1
        cached = base + self.round
        ledger.used -= -(-cached // ledger.bs)
        self.batch -= 1
        self.sum_context -= cached + 1
        return cached

    def rounds_to_next_finish(self) -> int:
        heap = self._by_finish
        while heap and self._fin.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] - self.round if heap else _INF

    def pop_finished(self) -> list[int]:
        """Requests whose last token came out of the round just completed; their blocks are freed."""
        done = []
        heap, fins, adm, now = self._by_finish, self._fin, self._adm, self.round
        while heap:
            fin, j = heap[0]
            if fins.get(j) != fin:
                heapq.heappop(heap)
                continue
            if fin != now:
                break
            heapq.heappop(heap)
            self._drop(j)
            del adm[j]
            done.append(j)
        return done

    def advance(self, k: int) -> None:
        """Run rounds round .. round+k-1 (round's blocks were taken by `prepare_round`)."""
        if k > 1:
            self.ledger.take(self.ledger.growth(self.round + 1, self.round + k, self.batch))
        self.sum_context += k * self.batch
        self.round += k

    def advance_and_stamp(self, k: int, t: float, finish: MutableSequence[float]) -> None:
        """`advance(k)`, then record `t` (when the k-th round ended) as the finish time of whoever it finished."""
        self.advance(k)
        heap = self._by_finish
        if heap and heap[0][0] > self.round:  # the earliest entry, stale or not, finishes later: nobody did now
            return
        for j in self.pop_finished():
            finish[j] = t

    def rounds_until_short(self) -> int:
        return self.ledger.rounds_until_short(self.round, self.batch)

    def can_admit(self, prompt_tokens: int, pending_blocks: int = 0) -> bool:
        """The engine's `can_admit`: nothing preempted waits, the prompt fits with the watermark free."""
        if self._waiting:
            return False
        ledger = self.ledger
        return -(-prompt_tokens // ledger.bs) + pending_blocks + ledger.watermark <= ledger.capacity - ledger.used

    def prepare_round(self) -> float:
        """Before round `round`: take its blocks, preempting the newest while short, then resume the oldest.

        Returns the seconds the preemptions and resumes add to the step.
        """
        ledger, r = self.ledger, self.round
        need = ledger.phase[-r % ledger.bs]
        if not self._waiting and need <= ledger.capacity - ledger.used:  # the common case: nothing to move
            ledger.take(need)
            return 0.0
        seconds = 0.0
        while self.batch and need > ledger.free:
            j = self._pop_newest()
            rounds_left = self._fin[j] - r
            cached = self._drop(j)
            self._parked[j] = (cached, rounds_left)
            heapq.heappush(self._waiting, (self._adm.pop(j), j))
            self.preemptions += 1
            self.preempted_tokens += cached
            seconds += self.preempt_cost(cached)
            need = ledger.need_at(r)
        ledger.take(need)
        spare = ledger.watermark if self.batch else 0
        while self._waiting:
            admission, j = self._waiting[0]
            cached, rounds_left = self._parked[j]
            blocks = ledger.blocks(cached + 1)
            if blocks + spare > ledger.free:
                break
            heapq.heappop(self._waiting)
            del self._parked[j]
            ledger.take(blocks)
            seconds += self.resume_cost(cached)
            # Its blocks for this round are taken above, so it joins after need_at(r) was paid.
            self.join(j, cached, rounds_left, admission)
            spare = ledger.watermark
        return seconds

    def _pop_newest(self) -> int:
        heap = self._by_newest
        while True:
            neg, j = heapq.heappop(heap)
            if self._adm.get(j) == -neg and j in self._base:
                return j


def preemption_costs(latency: LatencyModel, tp: int, pp: int, link_gbps: float,
                     policy: KVPolicy) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """(preempt, resume) seconds for a sequence of `tokens` cached tokens on a (tp, pp) instance.

    Swap copies each GPU's shard of the KV over its own host link, out at preemption and back at resume;
    recompute costs nothing at preemption and a prefill of the whole context on the instance at resume.
    """
    stage = latency.stage(tp, pp)
    if policy.preemption == "swap":
        per_token = stage.kv_bytes_per_token / (policy.host_link_gbps * 1e9)

        def swap(tokens: int) -> float:
            return tokens * per_token

        return swap, swap

    def recompute(tokens: int) -> float:
        t = latency.prefill_stage_time(tp, pp, 1, tokens, tokens * tokens)
        return LatencyModel.pipeline_latency(t, pp, int(tokens * stage.hidden_bytes_per_token), link_gbps)

    return (lambda _tokens: 0.0), recompute
