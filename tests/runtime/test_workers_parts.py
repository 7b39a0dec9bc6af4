"""The workers' parts on their own: the FCFS token-budget queue and the engine thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
from disagg_runtime.workers.engine_thread import EngineThread, EngineThreadStopped
from disagg_runtime.workers.prefill_queue import PrefillQueue, QueueFull


def fill(q: PrefillQueue, lengths: list[int]) -> None:
    for i, n in enumerate(lengths):
        q.push(f"r{i}", n, f"r{i}")


def test_batches_are_the_fcfs_prefix_under_the_token_budget():
    q = PrefillQueue(token_budget=100, max_queue=10)
    fill(q, [40, 50, 20, 5])
    assert q.take_batch(lambda lens: True) == ["r0", "r1"]  # 40 + 50; r2 would make 110
    assert q.queued_tokens == 25
    assert q.take_batch(lambda lens: True) == ["r2", "r3"]
    assert q.take_batch(lambda lens: True) == [] and len(q) == 0


def test_a_prompt_longer_than_the_budget_runs_alone():
    q = PrefillQueue(token_budget=100, max_queue=10)
    fill(q, [300, 10])
    assert q.take_batch(lambda lens: True) == ["r0"]
    assert q.take_batch(lambda lens: True) == ["r1"]


def test_no_skipping_when_the_head_does_not_fit_in_memory():
    q = PrefillQueue(token_budget=1000, max_queue=10)
    fill(q, [80, 10, 10])
    # Room for 50 tokens: the 80-token head waits, and the short ones behind it wait too (FCFS).
    assert q.take_batch(lambda lens: sum(lens) <= 50) == []
    assert q.take_batch(lambda lens: sum(lens) <= 95) == ["r0", "r1"]


def test_queue_limit_and_removal():
    q = PrefillQueue(token_budget=10, max_queue=2)
    fill(q, [1, 2])
    with pytest.raises(QueueFull, match="2 requests waiting"):
        q.push("r9", 1, "r9")
    assert q.has("r0") and q.remove("r0") == "r0" and q.remove("r0") is None and not q.has("r0")
    assert q.queued_tokens == 2 and len(q) == 1


async def test_engine_thread_runs_commands_and_steps_on_its_own_thread():
    seen: set[str] = set()
    steps = []

    def step() -> bool:
        seen.add(threading.current_thread().name)
        if len(steps) < 3:
            steps.append(1)
            return True
        return False

    t = EngineThread(step, name="engine-x")
    t.start()
    try:
        assert await t.submit(lambda: threading.current_thread().name) == "engine-x"
        with pytest.raises(ZeroDivisionError):
            await t.submit(lambda: 1 / 0)
        assert await t.submit(lambda: 7) == 7  # a failing command does not stop the thread
    finally:
        t.stop()
    assert seen == {"engine-x"} and len(steps) == 3
    with pytest.raises(EngineThreadStopped):
        t.submit(lambda: 1)


async def test_a_crashed_engine_thread_reports_instead_of_hanging():
    crash = threading.Event()

    def step() -> bool:
        if crash.is_set():
            raise RuntimeError("device lost")
        return False

    t = EngineThread(step, name="engine-y", idle_wait_s=0.01)
    t.start()
    crash.set()
    for _ in range(100):
        if not t.alive:
            break
        await asyncio.sleep(0.01)
    assert not t.alive and "device lost" in str(t.error)
    with pytest.raises(EngineThreadStopped, match="device lost"):
        t.submit(lambda: 1)
    t.stop()
