"""Planning off the event loop, cached by the spec's planning hash.

The search is CPU-bound Python that can take seconds; it runs in a small thread pool so kopf keeps
serving watch streams and other resources meanwhile. The planner's own search runs in a child process
that is killed at the planning deadline (PlanningTimeout) or when nobody waits for it any more, so a
pathological resource holds a thread for at most the deadline and every other resource gets its turn. Plans are cached by
`(spec.planning_hash(), profile digest)`: an update that only touches the image, scheduling or
`paused` re-renders without re-planning, and two resources with the same planning inputs share
one search (concurrent requests for the same key wait on the same future).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from disagg_planner.api import DisaggServingSpec, LatencyProfile, Plan
from disagg_planner.errors import PlanningTimeout
from disagg_planner.search.deadline import DEFAULT_DEADLINE_S, plan_within

PlanFn = Callable[..., Plan]
BeforeSearch = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class PlanResult:
    """A plan and whether it came from the cache."""

    plan: Plan
    cached: bool


@dataclass
class ProfileStore:
    """Latency profiles the operator image ships (or mounts), chosen by model shape and GPU name."""

    directory: Path | None = None
    _profiles: list[LatencyProfile] | None = field(default=None, init=False, repr=False)

    def find(self, spec: DisaggServingSpec) -> LatencyProfile | None:
        """The profile measured for this model shape on this GPU type, if one exists."""
        model, gpu = spec.model.spec, spec.cluster.gpu_spec.name
        for profile in self._load():
            if profile.gpu == gpu and profile.model == model:
                return profile
        return None

    def _load(self) -> list[LatencyProfile]:
        if self._profiles is None:
            paths = sorted(self.directory.glob("*.json")) if self.directory and self.directory.is_dir() else []
            self._profiles = [LatencyProfile.load(p) for p in paths]
        return self._profiles


def profile_digest(profile: LatencyProfile | None) -> str:
    if profile is None:
        return "analytic"
    return hashlib.sha256(profile.model_dump_json().encode()).hexdigest()[:16]


class PlanningService:
    """Runs `plan_fn(spec, profile, workers=...)` in threads; caches results per planning hash.

    Without `plan_fn` the planner's search runs in a killable child process bounded by `deadline_s`; an
    injected `plan_fn` (tests, other planners) runs in the thread itself, and its waiters are answered
    PlanningTimeout at the deadline while the thread finishes on its own.
    """

    def __init__(self, plan_fn: PlanFn | None = None, *, workers: int = 1, threads: int = 2,
                 cache_size: int = 256, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        if not deadline_s > 0:
            raise ValueError(f"the planning deadline must be positive, got {deadline_s}")
        self._plan_fn = plan_fn
        self.deadline_s = deadline_s
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="disagg-plan")
        self._cache: OrderedDict[str, Plan] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future[Plan]] = {}
        self.searches = 0  # searches actually run (observability and tests)
        self.hits = 0  # answers served from the cache
        self.search_seconds = 0.0  # wall time spent in searches

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def remember(self, key: str, plan: Plan) -> None:
        """Seed the cache (e.g. from a resource's status after an operator restart)."""
        self._cache[key] = plan
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    @staticmethod
    def key(spec: DisaggServingSpec, profile: LatencyProfile | None) -> str:
        return f"{spec.planning_hash()}-{profile_digest(profile)}"

    def _run(self, spec: DisaggServingSpec, profile: LatencyProfile | None, cancel: threading.Event,
             on_start: Callable[[], None]) -> Plan:
        on_start()
        if self._plan_fn is None:
            from disagg_planner.search import find_plan

            return plan_within(find_plan, spec, profile, deadline_s=self.deadline_s, cancel=cancel,
                               workers=self._workers)
        return self._plan_fn(spec, profile, workers=self._workers)

    async def plan(self, spec: DisaggServingSpec, profile: LatencyProfile | None,
                   before_search: BeforeSearch | None = None) -> PlanResult:
        """The plan for `spec`, cached or searched; `before_search` runs first when the caller must wait."""
        key = self.key(spec, profile)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            return PlanResult(self._cache[key], cached=True)
        if before_search is not None:
            await before_search()
        if key in self._inflight:
            return PlanResult(await asyncio.shield(self._inflight[key]), cached=True)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Plan] = loop.create_future()
        self._inflight[key] = future
        cancel = threading.Event()
        try:
            self.searches += 1
            started = loop.time()
            running = asyncio.Event()
            try:
                search = loop.run_in_executor(self._pool, partial(self._run, spec, profile, cancel,
                                                                  partial(loop.call_soon_threadsafe, running.set)))
                # The deadline counts from the start of the search, not from the wait for a free thread. The
                # child process enforces it itself; this bound covers an injected plan_fn, and the slack the
                # child's start-up and kill take.
                began = asyncio.ensure_future(running.wait())
                await asyncio.wait({search, began}, return_when=asyncio.FIRST_COMPLETED)
                began.cancel()
                plan = await asyncio.wait_for(search, self.deadline_s + (30 if self._plan_fn is None else 0))
            except asyncio.TimeoutError:
                raise PlanningTimeout(self.deadline_s) from None
            finally:
                cancel.set()  # a search nobody waits for any more (cancelled, timed out) is killed
                self.search_seconds += loop.time() - started
            future.set_result(plan)
            self.remember(key, plan)
            return PlanResult(plan, cached=False)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._inflight[key]
