"""The prefill worker's FCFS queue: batches are the longest prefix of the queue under a token budget.

FCFS without skipping: when the head does not fit (token budget or free KV), nothing behind it jumps
ahead, so a long prompt is never starved by a stream of short ones. A head longer than the whole
budget runs alone. Shared between the event loop (push, remove) and the engine thread (take).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

J = TypeVar("J")


class QueueFull(Exception):
    """The queue holds `max_queue` requests; the caller should answer 429."""


@dataclass
class Queued(Generic[J]):
    """A queued item with the prompt length the budget counts."""

    request_id: str
    tokens: int
    item: J = field(repr=False)


class PrefillQueue(Generic[J]):
    """Thread-safe FCFS queue with token-budget batching."""

    def __init__(self, *, token_budget: int, max_queue: int) -> None:
        if token_budget < 1 or max_queue < 1:
            raise ValueError(f"token_budget and max_queue must be >= 1, got {token_budget}, {max_queue}")
        self.token_budget = token_budget
        self.max_queue = max_queue
        self._items: deque[Queued[J]] = deque()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_tokens(self) -> int:
        return self._tokens

    def push(self, request_id: str, tokens: int, item: J) -> None:
        """Append; QueueFull when at the limit."""
        with self._lock:
            if len(self._items) >= self.max_queue:
                raise QueueFull(f"prefill queue is full ({self.max_queue} requests waiting)")
            self._items.append(Queued(request_id, tokens, item))
            self._tokens += tokens

    def has(self, request_id: str) -> bool:
        with self._lock:
            return any(q.request_id == request_id for q in self._items)

    def ids(self) -> list[str]:
        """Ids of the waiting requests, FCFS order."""
        with self._lock:
            return [q.request_id for q in self._items]

    def remove(self, request_id: str) -> J | None:
        """Take a waiting request out (abort); None if it is not waiting."""
        with self._lock:
            for q in self._items:
                if q.request_id == request_id:
                    self._items.remove(q)
                    self._tokens -= q.tokens
                    return q.item
        return None

    def take_batch(self, fits: Callable[[list[int]], bool]) -> list[J]:
        """Pop the longest FCFS prefix within the token budget for which `fits(prompt lengths)` holds."""
        with self._lock:
            lengths: list[int] = []
            total = 0
            for q in self._items:
                if lengths and total + q.tokens > self.token_budget:
                    break
                if not fits([*lengths, q.tokens]):
                    break
                lengths.append(q.tokens)
                total += q.tokens
            batch = [self._items.popleft() for _ in lengths]
            self._tokens -= total
            return [q.item for q in batch]
