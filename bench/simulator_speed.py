"""How fast the planner's simulator runs: wall time per simulation of a chatbot trace on this machine.

The search calls the simulator thousands of times, so this is the number that bounds search time.
OPT-13B on A100-80GB (analytic latency model), DistServe's ShareGPT shape, Poisson arrivals; each case
is timed as the median of several runs of the same trace. Prints a table and writes
bench/results/simulator_speed.json.

    python bench/simulator_speed.py [--requests 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.simulator import (
    ColocatedConfig,
    DisaggConfig,
    PhaseShape,
    simulate_colocated,
    simulate_disaggregated,
)
from disagg_planner.workloads import clip_requests, sample_requests
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "simulator_speed.json"

CASES = {
    "disagg P(tp2) D(tp1)": DisaggConfig(PhaseShape(2, 1, 1), PhaseShape(1, 1, 1), kv_link_gbps=25.0),
    "disagg 2xP(tp2) 3xD(tp1)": DisaggConfig(PhaseShape(2, 1, 2), PhaseShape(1, 1, 3), kv_link_gbps=25.0),
    "disagg P(pp2) D(pp2)": DisaggConfig(PhaseShape(1, 2, 1), PhaseShape(1, 2, 1), kv_link_gbps=25.0),
    "colocated 1x tp1": ColocatedConfig(PhaseShape(1, 1, 1)),
    "colocated 2x tp2": ColocatedConfig(PhaseShape(2, 1, 2)),
}
# Per-GPU rates around each configuration's goodput region (req/s per GPU), where the search bisects.
RATES_PER_GPU = (0.5, 1.5, 3.0)


def time_it(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model = MODEL_PRESETS["opt-13b"]
    latency = LatencyModel.analytic(model, GPU_PRESETS["A100-80GB"], intra_node_gbps=300.0)
    workload = WorkloadSpec(rate=1.0, dataset="chatbot")

    rows = []
    for name, cfg in CASES.items():
        for per_gpu in RATES_PER_GPU:
            rate = per_gpu * cfg.gpus
            trace = clip_requests(sample_requests(workload, rate, args.requests, seed=0), model.max_context)
            sim = simulate_disaggregated if isinstance(cfg, DisaggConfig) else simulate_colocated
            seconds = time_it(lambda sim=sim, cfg=cfg, trace=trace: sim(cfg, latency, trace), args.repeats)
            result = sim(cfg, latency, trace)
            rows.append({
                "case": name, "gpus": cfg.gpus, "rate_rps": rate, "requests": args.requests,
                "ms_per_simulation": seconds * 1e3, "us_per_request": seconds * 1e6 / args.requests,
                "attainment_chatbot_slo": result.attainment(0.2, 0.1),
            })
    sample_ms = time_it(lambda: sample_requests(workload, 3.0, args.requests, seed=0), args.repeats) * 1e3

    table = Table(title=f"simulator speed: {args.requests} chatbot requests, OPT-13B on A100 (median of {args.repeats})")
    for col in ("case", "GPUs", "rate req/s", "ms / sim", "us / request", "attainment (0.2 s, 0.1 s)"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(r["case"], str(r["gpus"]), f"{r['rate_rps']:.1f}", f"{r['ms_per_simulation']:.1f}",
                      f"{r['us_per_request']:.1f}", f"{r['attainment_chatbot_slo']:.3f}")
    console = Console(width=120)
    console.print(table)
    console.print(f"sampling the trace itself: {sample_ms:.1f} ms")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "simulator_speed",
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "requests": args.requests, "repeats": args.repeats, "sample_requests_ms": sample_ms,
        "max_ms_per_simulation": max(r["ms_per_simulation"] for r in rows),
        "rows": rows,
    }, indent=1) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
