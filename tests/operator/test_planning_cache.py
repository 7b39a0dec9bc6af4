"""Planning runs off the event loop, once per planning hash, and picks the matching latency profile."""

from __future__ import annotations

import asyncio
import threading

import pytest
from disagg_operator.planning import PlanningService, ProfileStore
from disagg_planner.api import MODEL_PRESETS, LatencyProfile, ShapeProfile
from disagg_planner.api.profile import DecodeSample, PrefillSample
from disagg_planner.errors import NoFeasiblePlan
from operator_plans import high_plan, spec


class CountingPlanner:
    """Stands in for find_plan; counts calls and can hold a search open until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self, the_spec, profile=None, *, workers=None):
        self.calls += 1
        self.release.wait(timeout=5)
        if the_spec.workload.rate > 100:
            raise NoFeasiblePlan("rate beyond any budget")
        return high_plan()


async def test_unchanged_planning_inputs_do_not_re_plan():
    planner = CountingPlanner()
    service = PlanningService(planner)
    first = await service.plan(spec(), None)
    rollout_only = await service.plan(spec(runtime={"image": "other:2"}, paused=True), None)
    assert not first.cached and rollout_only.cached and planner.calls == 1 and service.hits == 1
    await service.plan(spec(workload={"rate": 5.0, "dataset": "chatbot"}), None)
    assert planner.calls == 2 and service.searches == 2
    service.close()


async def test_concurrent_requests_share_one_search_and_the_loop_stays_free():
    planner = CountingPlanner()
    planner.release.clear()
    service = PlanningService(planner)
    tasks = [asyncio.create_task(service.plan(spec(), None)) for _ in range(3)]
    ticks = 0
    while planner.calls == 0 or ticks < 5:  # the loop keeps running while the search blocks its thread
        await asyncio.sleep(0.01)
        ticks += 1
    planner.release.set()
    results = await asyncio.gather(*tasks)
    assert planner.calls == 1 and [r.cached for r in results].count(False) == 1
    service.close()


async def test_failures_are_not_cached_and_reach_every_waiter():
    planner = CountingPlanner()
    service = PlanningService(planner)
    bad = spec(workload={"rate": 1000.0, "dataset": "chatbot"})
    for _ in range(2):
        with pytest.raises(NoFeasiblePlan):
            await service.plan(bad, None)
    assert planner.calls == 2
    service.close()


def _profile(gpu: str) -> LatencyProfile:
    return LatencyProfile(model=MODEL_PRESETS["opt-13b"], gpu=gpu, shapes=[ShapeProfile(
        prefill=[PrefillSample(batch_size=1, sum_tokens=128, sum_sq_tokens=128 * 128, seconds=0.02)],
        decode=[DecodeSample(batch_size=1, sum_context=128, seconds=0.01)])])


def test_profile_store_matches_model_shape_and_gpu(tmp_path):
    _profile("A100-80GB").save(tmp_path / "opt13b-a100.json")
    _profile("H100-80GB").save(tmp_path / "opt13b-h100.json")
    store = ProfileStore(tmp_path)
    assert store.find(spec()).gpu == "A100-80GB"
    assert store.find(spec(model={"preset": "llama-3-8b"})) is None
    assert ProfileStore(None).find(spec()) is None
    key_without = PlanningService.key(spec(), None)
    assert key_without != PlanningService.key(spec(), store.find(spec()))  # a new profile means a new plan
