"""The planner's simulator runs the runtime's KV policy: on a burst (every request at t=0, so neither
schedule depends on step times) the colocated simulator preempts exactly as the colocated worker does."""

from __future__ import annotations

import asyncio

import pytest
from disagg_planner import simulator as sim
from disagg_planner.api import GPU_PRESETS
from disagg_planner.latency import LatencyModel
from disagg_planner.latency.memory import workspace_bytes
from disagg_planner.latency.shape import stage_shape
from disagg_planner.workloads import SimRequest
from disagg_runtime.engine import Engine
from disagg_runtime.workers.base import WorkerConfig
from disagg_runtime.workers.colocated import ColocatedWorker
from disagg_runtime.workers.protocol import PrefillRequest, SamplingSpec
from disagg_runtime.workers.relay import TokenLog

BLOCKS, BLOCK, BUDGET = 24, 8, 256


def _latency(engine: Engine) -> LatencyModel:
    """An analytic model of the engine's shape on a GPU whose KV capacity is exactly the engine's cache."""
    spec = engine.config.to_model_spec("tiny", dtype="float32")
    stage = stage_shape(spec, 1, 1)
    need = (BLOCKS * BLOCK + 0.5) * stage.kv_bytes_per_token + stage.weight_bytes + workspace_bytes(spec, 1)
    gpu = GPU_PRESETS["CPU"].model_copy(update={"memory_gib": need / (0.9 * 2**30)})
    return LatencyModel.analytic(spec, gpu, 100.0)


def _trace(n: int) -> list[SimRequest]:
    return [SimRequest(0.0, 5 + (13 * i) % 30, 20 + (29 * i) % 60) for i in range(n)]


async def _serve(engine: Engine, trace: list[SimRequest]) -> None:
    worker = ColocatedWorker(engine, WorkerConfig(prefill_token_budget=BUDGET))
    worker.loop = asyncio.get_running_loop()
    for i, r in enumerate(trace):
        msg = PrefillRequest(request_id=f"r{i}", prompt_ids=[4 + i] * r.input_len,
                             sampling=SamplingSpec(max_tokens=r.output_len, ignore_eos=True))
        assert worker._enqueue(worker._job(msg, list(msg.prompt_ids), TokenLog()))
    while worker.jobs:
        worker._step()
        await asyncio.sleep(0)


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
async def test_simulated_preemptions_equal_the_colocated_workers(llama_dir, preemption):
    trace = _trace(16)
    engine = Engine.load(llama_dir, num_blocks=BLOCKS, block_size=BLOCK, preemption=preemption)
    await _serve(engine, trace)
    policy = sim.KVPolicy(block_size=BLOCK, preemption=preemption)
    res = sim.simulate_colocated(sim.ColocatedConfig(sim.PhaseShape(1, 1, 1), BUDGET, 0.9, policy),
                                 _latency(engine), trace)
    assert res.kv_capacity_tokens == BLOCKS * BLOCK
    stats = engine.preemption_stats
    assert stats.preemptions > 5
    assert res.preemptions == stats.preemptions
    assert res.preempted_tokens == stats.swapped_tokens + stats.recomputed_tokens
