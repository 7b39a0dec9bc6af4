"""Running search tasks on worker processes, in fixed-size waves with branch-and-bound pruning between them.

Waves have a fixed size whatever the worker count, so which shapes get pruned, and so the plan, does not
depend on how many cores ran the search.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from .evaluate import PhaseResult, PhaseTask, phase_goodput
from .problem import SearchProblem

T = TypeVar("T")
R = TypeVar("R")

WAVE = 4  # items evaluated between pruning decisions
Progress = Callable[[int, int], None]


class TaskPool:
    """Maps a function over tasks: in-process for one worker, else on a process pool (created lazily)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._executor: Executor | None = None

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        if self.workers == 1 or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        if self._executor is None:
            # fork is cheapest and safe in a single-threaded process; a threaded host (the operator) gets
            # forkserver, whose children do not inherit other threads' locks.
            method = "fork" if threading.active_count() == 1 else "forkserver"
            context = multiprocessing.get_context(method)
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        chunk = max(1, len(tasks) // (self.workers * 2))
        return list(self._executor.map(fn, tasks, chunksize=chunk))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class PhaseCache:
    """Goodput of every phase task evaluated so far (tasks recur across the search's modes)."""

    goodput: dict[PhaseTask, float] = field(default_factory=dict)
    simulations: int = 0

    def fill(self, problem: SearchProblem, tasks: Iterable[PhaseTask], pool: TaskPool) -> None:
        todo = list(dict.fromkeys(t for t in tasks if t not in self.goodput))
        results: list[PhaseResult] = pool.map(partial(phase_goodput, problem), todo)
        for result in results:
            self.goodput[result.task] = result.goodput
            self.simulations += result.simulations


@dataclass(frozen=True)
class Item:
    """A thing the search may pick (a shape, a unit): its GPUs, a rate bound, and the phase tasks it needs.

    `value` turns the tasks' goodputs into the item's goodput (one task: itself; a unit: the slower phase).
    """

    key: object
    gpus: int
    bound: float
    tasks: tuple[PhaseTask, ...]

    def value(self, cache: PhaseCache) -> float:
        return min(cache.goodput[t] for t in self.tasks)


def branch_and_bound(
    items: list[Item], problem: SearchProblem, cache: PhaseCache, pool: TaskPool, tick: Callable[[int], None]
) -> dict[object, float]:
    """Goodput of every item that could matter; the rest are dropped as dominated.

    An item A is dominated once some evaluated item B, replicated floor(A.gpus / B.gpus) times, serves at
    least A's rate bound: any allocation using A does as well with those copies of B, on no more GPUs.
    Items are visited smallest first, so the cheap shapes that dominate most are known early.
    """
    order = sorted(items, key=lambda it: (it.gpus, -it.bound))
    values: dict[object, float] = {}
    found: list[tuple[int, float]] = []  # (gpus, goodput) of evaluated items
    for wave in _waves(order, values, found, tick):
        cache.fill(problem, (t for it in wave for t in it.tasks), pool)
        for it in wave:
            values[it.key] = it.value(cache)
            found.append((it.gpus, values[it.key]))
        tick(len(wave))
    return values


def _waves(
    order: list[Item], values: dict[object, float], found: list[tuple[int, float]], tick: Callable[[int], None]
) -> Iterator[list[Item]]:
    pending = list(order)
    while pending:
        wave: list[Item] = []
        rest: list[Item] = []
        for it in pending:
            if len(wave) < WAVE and not _dominated(it, found):
                wave.append(it)
            elif len(wave) >= WAVE:
                rest.append(it)
            else:
                tick(1)  # pruned
        if wave:
            yield wave
        pending = rest


def _dominated(item: Item, found: list[tuple[int, float]]) -> bool:
    if item.bound <= 0:
        return True
    return any(g <= item.gpus and (item.gpus // g) * v >= item.bound for g, v in found if v > 0)
