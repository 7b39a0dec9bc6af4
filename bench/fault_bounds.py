"""How long the fault bounds take to act on this machine: a frozen worker (SIGSTOP) under the router's
response timeout, and a pathological plan search under the planning deadline.

Frozen prefill: one of two prefill workers is stopped; requests routed to it must end (retried on the other)
within about the response timeout. Frozen decode: the only decode worker is stopped; a request ends with an
error within the timeout, and new requests get 503 + Retry-After up front once the poll marks it down.
Planning: a schema-valid search that would run for hours (4096 x 64 GPUs at 1e6 req/s) is stopped at the
deadline; the overshoot is the time the kill and the answer take. Prints a table and writes
bench/results/fault_bounds.json.

    python bench/fault_bounds.py [--timeout 3] [--deadline 3] [--requests 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from disagg_planner.api import DisaggServingSpec
from disagg_planner.errors import PlanningTimeout
from disagg_planner.search import find_plan
from disagg_planner.search.deadline import plan_within
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "fault_bounds.json"
PATHOLOGICAL = {"model": {"preset": "opt-13b"}, "cluster": {"nodes": 4096, "gpusPerNode": 64},
                "workload": {"rate": 1e6, "dataset": "chatbot"}, "slo": {"ttftMs": 250, "tpotMs": 100}}


async def _post(s: aiohttp.ClientSession, url: str, prompt: list[int]) -> tuple[int, float]:
    t0 = time.monotonic()
    async with s.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}) as resp:
        await resp.read()
        return resp.status, time.monotonic() - t0


async def _marked_down(s: aiohttp.ClientSession, url: str, role: str, want: int, t0: float) -> float:
    while True:
        async with s.get(f"{url}/readyz") as resp:
            if (await resp.json())[role] == want:
                return time.monotonic() - t0
        await asyncio.sleep(0.05)


async def frozen_workers(model_dir: Path, timeout_s: float, requests: int) -> list[dict]:
    cluster = LocalCluster(model_dir=model_dir, port=0, prefill_workers=2,
                           worker_args=["--device", "cpu", "--num-kv-blocks", "256"],
                           router_args=["--response-timeout", str(timeout_s), "--heartbeat-timeout", str(timeout_s)])
    rows = []
    with cluster:
        async with aiohttp.ClientSession() as s:
            await _post(s, cluster.url, [5, 6, 7])
            for name, role, left in (("prefill-0", "prefill", 1), ("decode-0", "decode", 0)):
                pid = cluster.processes[name].pid
                os.kill(pid, signal.SIGSTOP)
                t0 = time.monotonic()
                try:
                    results = await asyncio.gather(*(_post(s, cluster.url, [5 + i, 6, 7]) for i in range(requests)))
                    down = await _marked_down(s, cluster.url, role, left, t0)
                    after = await _post(s, cluster.url, [9, 9, 9])
                finally:
                    os.kill(pid, signal.SIGCONT)
                rows.append({"case": f"SIGSTOP {name}", "timeout_s": timeout_s, "requests": requests,
                             "statuses": sorted({st for st, _ in results}),
                             "max_request_s": max(t for _, t in results), "marked_down_s": down,
                             "next_request": {"status": after[0], "seconds": after[1]}})
                await asyncio.sleep(3 * timeout_s)  # thawed: let the polls bring it back
    return rows


def planning(deadline_s: float) -> list[dict]:
    spec = DisaggServingSpec.model_validate(PATHOLOGICAL)
    rows = []
    for host in ("single-threaded (fork)", "threaded (forkserver)"):
        blocker = None
        if host.startswith("threaded"):
            blocker = threading.Event()
            threading.Thread(target=blocker.wait, daemon=True).start()
        t0 = time.monotonic()
        try:
            plan_within(find_plan, spec, deadline_s=deadline_s, workers=1)
            outcome = "plan"
        except PlanningTimeout:
            outcome = "PlanningTimeout"
        took = time.monotonic() - t0
        if blocker is not None:
            blocker.set()
        rows.append({"case": f"pathological search, {host}", "deadline_s": deadline_s, "outcome": outcome,
                     "seconds": took, "overshoot_s": took - deadline_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3.0, help="router --response-timeout/--heartbeat-timeout")
    parser.add_argument("--deadline", type=float, default=3.0, help="planning deadline, seconds")
    parser.add_argument("--requests", type=int, default=6, help="concurrent requests while a worker is frozen")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(Path(tmp) / "tiny-llama", seed=13)
        frozen = asyncio.run(frozen_workers(model_dir, args.timeout, args.requests))
    plans = planning(args.deadline)

    table = Table(title="fault bounds")
    for col in ("case", "bound (s)", "outcome", "worst request / answer (s)", "marked down after (s)"):
        table.add_column(col)
    for r in frozen:
        table.add_row(r["case"], f"{r['timeout_s']:g}", "/".join(map(str, r["statuses"])) +
                      f", next {r['next_request']['status']}", f"{r['max_request_s']:.2f}", f"{r['marked_down_s']:.2f}")
    for r in plans:
        table.add_row(r["case"], f"{r['deadline_s']:g}", r["outcome"], f"{r['seconds']:.2f}", "-")
    Console().print(table)
    summary = {
        "max_frozen_request_over_timeout_s": max(r["max_request_s"] - r["timeout_s"] for r in frozen),
        "max_marked_down_s": max(r["marked_down_s"] for r in frozen),
        "max_planning_overshoot_s": max(r["overshoot_s"] for r in plans),
        "all_searches_stopped": all(r["outcome"] == "PlanningTimeout" for r in plans),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "fault_bounds", "summary": summary,
                                   "machine": {"processor": platform.machine(), "cpus": os.cpu_count(),
                                               "python": platform.python_version()},
                                   "frozen_workers": frozen, "planning": plans}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
