"""Per-GPU goodput of the three serving modes the planner chooses between (DistServe Fig. 8: 2.0-4.6x over vLLM).

For OPT-13B, OPT-66B and Llama-3-8B on chatbot, code and summarization, one `find_plan` in `spec.mode: auto`
evaluates disaggregated serving (both node-affinity algorithms on this slow network), colocated prefill-priority (vLLM before
chunked prefill; DistServe's "vLLM++" baseline) and colocated chunked prefill (Sarathi-Serve; vLLM today),
all on the same search, simulator and latency model (analytic roofline calibrated to DistServe's A100
profile of OPT-13B), on DistServe's testbed: 4 nodes x 8 A100-80GB, NVLink inside a node, 25 Gbit/s between
nodes. The target rate is set past what 32 GPUs serve for the OPT models, so each mode's plan spends the
budget and its goodput per GPU is what that hardware sustains at 90% SLO attainment (Llama-3-8B meets it on
fewer GPUs; per GPU is still comparable). SLOs: DistServe Table 1 per workload (chatbot 0.25 s / 0.1 s for
OPT-13B and 2.5 s / 0.15 s for OPT-66B; code 0.125 s / 0.2 s; summarization 15 s / 0.15 s); the paper runs
code and summarization only with OPT-66B and never Llama-3-8B, so those rows reuse the workload's SLOs
(Llama-3-8B chatbot takes OPT-13B's, the nearer size). Prints a table and writes
bench/results/goodput_vs_colocated.json.

    python bench/goodput_vs_colocated.py [--workers N] [--only opt-13b,code]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from disagg_planner.api import DisaggServingSpec, Plan
from disagg_planner.errors import NoFeasiblePlan
from disagg_planner.search import find_plan
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "goodput_vs_colocated.json"
PAPER_GAIN = "2.0-4.6x (chatbot, vs vLLM 0.2)"
SATURATING_RATE = 1000.0  # req/s: no 32-GPU OPT plan reaches it, so every mode spends the whole budget
MODES = ("disaggregated", "colocated", "colocated-chunked")

MODELS = (("OPT-13B", "opt-13b"), ("OPT-66B", "opt-66b"), ("Llama-3-8B", "llama-3-8b"))
# (workload, TTFT ms, TPOT ms) by model preset; DistServe Table 1 where it has the pair, else see the doc.
SLOS = {
    "chatbot": {"opt-13b": (250, 100), "opt-66b": (2500, 150), "llama-3-8b": (250, 100)},
    "code": {"opt-13b": (125, 200), "opt-66b": (125, 200), "llama-3-8b": (125, 200)},
    "summarization": {"opt-13b": (15000, 150), "opt-66b": (15000, 150), "llama-3-8b": (15000, 150)},
}
SLO_SOURCE = {("chatbot", "opt-13b"): "Table 1", ("chatbot", "opt-66b"): "Table 1", ("code", "opt-66b"): "Table 1",
              ("summarization", "opt-66b"): "Table 1"}


def spec_for(model: str, workload: str) -> DisaggServingSpec:
    ttft, tpot = SLOS[workload][model]
    return DisaggServingSpec.model_validate({
        "model": {"preset": model},
        "cluster": {"nodes": 4, "gpusPerNode": 8, "gpuType": "A100-80GB", "intraNodeBandwidth": "300GB",
                    "interNodeBandwidth": "25Gbit"},
        "workload": {"rate": SATURATING_RATE, "dataset": workload},
        "slo": {"ttftMs": ttft, "tpotMs": tpot, "attainment": 0.9},
        "mode": "auto",
    })


def describe(plan: Plan) -> str:
    if plan.mode == "colocated":
        c = plan.colocated
        how = f"chunked {plan.chunk_token_budget}" if plan.colocated_prefill == "chunked" else "priority"
        return f"C tp{c.tp}pp{c.pp} x{c.replicas} ({how})"
    p, d = plan.prefill, plan.decode
    return f"P tp{p.tp}pp{p.pp} x{p.replicas} + D tp{d.tp}pp{d.pp} x{d.replicas} ({plan.affinity})"


def row(label: str, model: str, workload: str, workers: int) -> dict:
    spec = spec_for(model, workload)
    start = time.perf_counter()
    try:
        plan = find_plan(spec, workers=workers)
    except NoFeasiblePlan as exc:
        return {"model": label, "workload": workload, "ttft_ms": spec.slo.ttft_ms, "tpot_ms": spec.slo.tpot_ms,
                "infeasible": exc.reason, "search_s": time.perf_counter() - start}
    alts = {a.mode: a for a in plan.alternatives}
    colocated_best = max(alts[m].per_gpu_goodput for m in ("colocated", "colocated-chunked"))
    disagg = alts["disaggregated"].per_gpu_goodput
    return {
        "model": label, "workload": workload, "ttft_ms": spec.slo.ttft_ms, "tpot_ms": spec.slo.tpot_ms,
        "slo_source": SLO_SOURCE.get((workload, model), "workload's Table 1 SLOs"),
        "modes": {m: {"per_gpu_goodput": alts[m].per_gpu_goodput, "goodput_rps": alts[m].goodput_rps,
                      "gpus": alts[m].gpus, "meets_target": alts[m].meets_target,
                      "chunk_token_budget": alts[m].chunk_token_budget, "note": alts[m].note} for m in MODES},
        "chosen": plan.serving_mode, "chosen_plan": describe(plan), "chosen_per_gpu_goodput": plan.per_gpu_goodput,
        "disaggregated_over_best_colocated": disagg / colocated_best if colocated_best else None,
        "chunked_over_priority": (alts["colocated-chunked"].per_gpu_goodput / alts["colocated"].per_gpu_goodput
                                  if alts["colocated"].per_gpu_goodput else None),
        "choice": plan.choice, "search_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="comma-separated model presets and/or workloads to run")
    args = parser.parse_args()
    only = {x for x in args.only.split(",") if x}

    rows = []
    for label, model in MODELS:
        for workload in SLOS:
            if only and not ({model, workload} & only):
                continue
            rows.append(row(label, model, workload, args.workers))
            print(f"{label} {workload}: {rows[-1].get('chosen', 'infeasible')} ({rows[-1]['search_s']:.1f} s)",
                  flush=True)

    table = Table(title="per-GPU goodput (req/s/GPU) by serving mode, 4 x 8 A100-80GB, 25 Gbit/s, 90% attainment")
    for col in ("model", "workload", "TTFT / TPOT", *MODES, "deployed", "disagg / best colocated", "search s"):
        table.add_column(col, justify="left" if col in ("model", "workload", "deployed") else "right")
    for r in rows:
        slo = f"{r['ttft_ms'] / 1000:g} s / {r['tpot_ms'] / 1000:g} s"
        if "infeasible" in r:
            table.add_row(r["model"], r["workload"], slo, "-", "-", "-", "infeasible", "-", f"{r['search_s']:.1f}")
            continue
        cells = []
        for m in MODES:
            a = r["modes"][m]
            cell = f"{a['per_gpu_goodput']:.3g}" + (f" ({a['chunk_token_budget']})" if a["chunk_token_budget"] else "")
            cells.append(f"[bold]{cell}[/bold]" if m == r["chosen"] else cell)
        gain = r["disaggregated_over_best_colocated"]
        table.add_row(r["model"], r["workload"], slo, *cells, f"{r['chosen']}: {r['chosen_plan']}",
                      f"{gain:.2f}x" if gain is not None else "n/a", f"{r['search_s']:.1f}")
    console = Console(width=220)
    console.print(table)
    console.print(f"paper: {PAPER_GAIN}")

    feasible = [r for r in rows if "infeasible" not in r]
    wins = {m: sum(r["chosen"] == m for r in feasible) for m in MODES}
    gains = [r["disaggregated_over_best_colocated"] for r in feasible if r["disaggregated_over_best_colocated"]]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "goodput_vs_colocated",
        "summary": {"cases": len(rows), "deployed_mode_counts": wins,
                    "disaggregated_over_best_colocated_range": [min(gains), max(gains)] if gains else None,
                    "deployed_is_best_per_gpu": all(
                        r["chosen_per_gpu_goodput"] >= max(a["per_gpu_goodput"] for a in r["modes"].values()
                                                          if a["meets_target"] or not any(
                                                              b["meets_target"] for b in r["modes"].values()))
                        - 1e-12 for r in feasible)},
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "cluster": "4 nodes x 8 A100-80GB, 300 GB/s NVLink, 3.125 GB/s between nodes",
        "latency_model": "analytic (A100-calibrated roofline)", "attainment_target": 0.9,
        "target_rate_rps": SATURATING_RATE, "paper_gain": PAPER_GAIN, "rows": rows,
    }, indent=1) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
