"""How long the placement search takes as the cluster grows (goals on 2 cores: < 3 s at 4 x 8, < 10 s at 128 x 8).

Each case runs the whole `find_plan` in the spec's default mode auto (the disaggregated search, both
colocated modes, the mode choice and the chosen plan's goodput interval) with all cores, on nodes of 8
A100-80GB with the analytic latency model, DistServe's chatbot workload and SLOs (OPT-13B: TTFT 0.25 s /
TPOT 0.1 s; OPT-66B: 2.5 s / 0.15 s), at 5 req/s per node, as issue #16 measured. The machine is shared:
every timed run records its wall seconds, the CPU seconds of the search (this process and its reaped
worker processes), which other jobs' load inflates much less than the wall time, and the 1-minute load
average before and after; each goal is judged on both. Every row states whether the plan's goodput and
attainment at target agree. DistServe reports ~1.3 min on a 96-core machine for 32 GPUs. Prints a table
and writes bench/results/planner_search_time.json.

    python bench/planner_search_time.py [--repeats 1] [--nodes 4 16 64 128] [--inter-gbps 25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

from disagg_planner.api import DisaggServingSpec, Plan
from disagg_planner.search import find_plan
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "planner_search_time.json"
GOALS_S = {4: 3.0, 128: 10.0}
RATE_PER_NODE = 5.0
# (model, TTFT ms, TPOT ms): DistServe's chatbot SLOs.
MODELS = [("opt-13b", 250, 100), ("opt-66b", 2500, 150)]


def spec_for(model: str, ttft: float, tpot: float, nodes: int, inter_gbps: float) -> DisaggServingSpec:
    return DisaggServingSpec.model_validate({
        "model": {"preset": model},
        "cluster": {"nodes": nodes, "gpusPerNode": 8, "gpuType": "A100-80GB",
                    "interNodeBandwidth": f"{inter_gbps:g}GB"},
        "workload": {"rate": RATE_PER_NODE * nodes, "dataset": "chatbot"},
        "slo": {"ttftMs": ttft, "tpotMs": tpot},
    })


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the search's worker pool is reaped per search)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(spec: DisaggServingSpec, workers: int, repeats: int
          ) -> tuple[list[float], list[float], list[list[float]], Plan]:
    samples, cpu, loads, plan = [], [], [], None
    for _ in range(repeats):
        before = os.getloadavg()[0]
        start, start_cpu = time.perf_counter(), _cpu_s()
        plan = find_plan(spec, workers=workers)
        samples.append(time.perf_counter() - start)
        cpu.append(_cpu_s() - start_cpu)
        loads.append([before, os.getloadavg()[0]])
    return samples, cpu, loads, plan


def describe(plan: Plan) -> str:
    if plan.mode == "colocated":
        c = plan.colocated
        return f"C tp{c.tp}pp{c.pp} x{c.replicas}"
    p, d = plan.prefill, plan.decode
    return f"P tp{p.tp}pp{p.pp} x{p.replicas}, D tp{d.tp}pp{d.pp} x{d.replicas}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 64, 128])
    parser.add_argument("--inter-gbps", type=float, default=25.0,
                        help="inter-node bandwidth, GB/s (25 = 200 Gbit/s; 3.125 = DistServe's 25 Gbit/s testbed)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    rows = []
    for nodes in args.nodes:
        for model, ttft, tpot in MODELS:
            spec = spec_for(model, ttft, tpot, nodes, args.inter_gbps)
            samples, cpu, loads, plan = timed(spec, cores, args.repeats)
            iv = plan.goodput_interval
            target = spec.slo.attainment
            rows.append({
                "nodes": nodes, "gpus_in_cluster": nodes * 8, "model": model, "workers": cores,
                "median_s": statistics.median(samples), "samples_s": samples, "cpu_s": cpu,
                "load_avg_1m_before_after": loads,
                "affinity": plan.affinity, "plan": describe(plan), "gpus": plan.gpus,
                "target_rps": plan.target_rate_rps, "goodput_rps": plan.goodput_rps,
                "goodput_interval_rps": [iv.low_rps, iv.high_rps] if iv else None,
                "interval_method": iv.method if iv else None,
                "attainment_at_target": plan.predicted_attainment,
                "consistent": (plan.goodput_rps >= plan.target_rate_rps) == (plan.predicted_attainment >= target),
            })

    table = Table(title=f"placement search time, N nodes x 8 A100-80GB, {RATE_PER_NODE:g} req/s per node, "
                        f"{cores} workers (median of {args.repeats})")
    for col in ("nodes", "model", "s", "CPU s", "load 1m", "affinity", "plan", "GPUs", "target", "goodput (interval)",
                "attain.", "agree"):
        table.add_column(col, justify="left" if col in ("model", "plan", "affinity", "goodput (interval)") else "right")
    for r in rows:
        lo, hi = r["goodput_interval_rps"] or (float("nan"), float("nan"))
        load = max(x for pair in r["load_avg_1m_before_after"] for x in pair)
        table.add_row(str(r["nodes"]), r["model"], f"{r['median_s']:.1f}", f"{statistics.median(r['cpu_s']):.1f}",
                      f"{load:.1f}", r["affinity"], r["plan"],
                      str(r["gpus"]), f"{r['target_rps']:g}", f"{r['goodput_rps']:.1f} ({lo:.1f}-{hi:.1f})",
                      f"{r['attainment_at_target']:.1%}", "yes" if r["consistent"] else "NO")
    console = Console(width=160)
    console.print(table)

    by_nodes = {str(n): max(r["median_s"] for r in rows if r["nodes"] == n) for n in args.nodes}
    cpu_by_nodes = {str(n): max(statistics.median(r["cpu_s"]) for r in rows if r["nodes"] == n) for n in args.nodes}
    loads = [x for r in rows for pair in r["load_avg_1m_before_after"] for x in pair]
    goals = {}
    for n, g in GOALS_S.items():
        if str(n) not in by_nodes:
            continue
        wall, cpu = by_nodes[str(n)], cpu_by_nodes[str(n)]
        near = [x for r in rows if r["nodes"] == n for pair in r["load_avg_1m_before_after"] for x in pair]
        goals[f"{n}x8"] = {"goal_s": g, "slowest_wall_s": wall, "slowest_cpu_s": cpu, "met_on_wall": wall < g,
                           "met_on_cpu": cpu < g, "load_avg_1m_range": [min(near), max(near)]}
    console.print(f"slowest per cluster size: wall s {_fmt(by_nodes)}, CPU s {_fmt(cpu_by_nodes)}; load average "
                  f"(1 min) {min(loads):.1f}-{max(loads):.1f} on {cores} cores")
    for name, goal in goals.items():
        console.print(f"goal {name} < {goal['goal_s']:g} s: CPU {goal['slowest_cpu_s']:.1f} s "
                      f"({'met' if goal['met_on_cpu'] else 'NOT met'}), wall {goal['slowest_wall_s']:.1f} s "
                      f"({'met' if goal['met_on_wall'] else 'NOT met'}) at load "
                      f"{goal['load_avg_1m_range'][0]:.1f}-{goal['load_avg_1m_range'][1]:.1f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "planner_search_time",
        "machine": {"processor": platform.processor() or platform.machine(), "cores": cores,
                    "python": platform.python_version()},
        "cluster": "N nodes x 8 A100-80GB", "rate_per_node_rps": RATE_PER_NODE,
        "inter_node_gbps": args.inter_gbps, "repeats": args.repeats,
        "summary": {
            "seconds_by_nodes": by_nodes,
            "cpu_seconds_by_nodes": cpu_by_nodes,
            "seconds_by_model_and_nodes": {m: {str(r["nodes"]): r["median_s"] for r in rows if r["model"] == m}
                                           for m, _, _ in MODELS},
            "goals": goals,
            "load_avg_1m_range": [min(loads), max(loads)],
            "all_consistent": all(r["consistent"] for r in rows),
        },
        "rows": rows,
    }, indent=1) + "\n")
    console.print(f"wrote {RESULTS}")


def _fmt(by_nodes: dict[str, float]) -> str:
    return ", ".join(f"{n}: {v:.1f}" for n, v in by_nodes.items())


if __name__ == "__main__":
    main()
