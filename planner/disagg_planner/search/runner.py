"""Running search tasks on worker processes, with branch-and-bound pruning as results come in.

Pruning drops only items that are dominated (see `branch_and_bound`), and the dominated items that did get
evaluated are dropped at the end, so the surviving set, and so the plan, does not depend on how many cores
ran the search or in which order results arrived.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from .evaluate import PhaseResult, PhaseTask, phase_goodput
from .problem import SearchProblem

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int], None]


class TaskPool:
    """Maps a function over tasks: in-process for one worker, else on a process pool (created lazily)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._executor: Executor | None = None
        self._closed = False

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        if self.workers == 1 or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        return list(self._pool().map(fn, tasks))

    def submit(self, fn: Callable[..., R], *args: object) -> Future:
        """Run `fn(*args)` on a worker; with one worker, right here (the future is already done)."""
        if self.workers == 1:
            done: Future = Future()
            done.set_result(fn(*args))
            return done
        return self._pool().submit(fn, *args)

    def _pool(self) -> Executor:
        if self._closed:  # a pool made now would outlive the search (its processes and threads leak)
            raise RuntimeError("TaskPool used after close(); run the work inside its `with` block")
        if self._executor is None:
            # fork is cheapest and safe in a single-threaded process; a threaded host (the operator) gets
            # forkserver, whose children do not inherit other threads' locks.
            method = "fork" if threading.active_count() == 1 else "forkserver"
            context = multiprocessing.get_context(method)
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self._executor

    def close(self) -> None:
        self._closed = True
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

    def record(self, result: PhaseResult) -> None:
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
    """Goodput of every item that is not dominated by another.

    An item A is dominated when some item B, replicated floor(A.gpus / B.gpus) times, serves at least A's
    rate: any allocation using A does as well with those copies of B, on no more GPUs. Before evaluation
    A's rate is its capacity bound (goodput never exceeds it), afterwards its goodput. Items are visited
    smallest first, so the cheap shapes that dominate most are known early; one task per worker is in
    flight, so every result can prune the queue before the next task starts (a task takes milliseconds,
    handing out the next one microseconds; a second task per worker cost ~5% more simulations).
    """
    queue = deque(sorted(items, key=lambda it: (it.gpus, -it.bound)))
    values: dict[object, float] = {}
    found: list[tuple[int, float]] = []  # (gpus, goodput) of evaluated items
    running: dict[PhaseTask, Future] = {}
    waiting: list[Item] = []

    def resolve(item: Item) -> None:
        values[item.key] = item.value(cache)
        found.append((item.gpus, values[item.key]))
        tick(1)

    while queue or waiting:
        while queue and len(running) < pool.workers:
            item = queue.popleft()
            if _dominated(item.gpus, item.bound, found):
                tick(1)
                continue
            if all(t in cache.goodput for t in item.tasks):
                resolve(item)  # evaluated by an earlier step of the search: it prunes the queue right away
                continue
            for task in item.tasks:
                if task not in cache.goodput and task not in running:
                    running[task] = pool.submit(phase_goodput, problem, task)
            waiting.append(item)
        if running:
            done, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for task in [t for t, f in running.items() if f in done]:
                cache.record(running.pop(task).result())
        for item in [it for it in waiting if all(t in cache.goodput for t in it.tasks)]:
            waiting.remove(item)
            resolve(item)
    by_key = {it.key: it for it in items}
    others = [(by_key[k].gpus, v, k) for k, v in values.items()]
    return {
        k: v for k, v in values.items()
        if v > 0 and not _dominated(by_key[k].gpus, v, [(g, w) for g, w, key in others if key != k], strict=True)
    }


def _dominated(gpus: int, rate: float, found: Iterable[tuple[int, float]], strict: bool = False) -> bool:
    """Replicas of a found item fitting in `gpus` serve at least `rate` (more than it, if `strict`)."""
    if rate <= 0:
        return True
    for g, v in found:
        if v > 0 and g <= gpus:
            copies = (gpus // g) * v
            if copies > rate or (not strict and copies >= rate):
                return True
    return False
