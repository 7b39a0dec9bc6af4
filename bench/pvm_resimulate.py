"""Predict a stored predicted-vs-measured sweep's measured points again, from another latency profile.

`predicted_vs_measured.py` profiles and measures in one run, so a profile that went wrong (a GPU fresh
from idle, a spike from another job) spoils that run's predictions while its measurements stay good.
This script keeps the measurements (each rate's attainment, TTFT and TPOT, as the bench client saw them)
and re-simulates the same traces (the stored workload, seed and request count; the stored SLO, so both
sides are judged alike) with the latency model of `--profile`, e.g. one `disagg profile --served`
wrote on another day. The prediction then owes nothing to the measured run.

    python bench/pvm_resimulate.py bench/results/predicted_vs_measured-cuda-llama-8b.json \\
        --profile bench/results/profile-h200-llama-8b.json

writes `<result>-resimulated.json` with the same top-level `summary` as the bench (per mode,
`max_abs_gap_pts` and the points it comes from).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from disagg_planner.api import LatencyProfile, LengthHistogram, WorkloadSpec
from disagg_planner.workloads import sample_requests
from predicted_vs_measured import (
    engine_tpot_ratio,
    gpu_for_capacity,
    kv_link,
    model_for,
    predicted_goodput,
    simulate,
    summary_of,
)


def resimulate(measured: dict, prof: LatencyProfile) -> dict:
    """`measured` (a bench result) with every point's prediction made again from `prof`."""
    gpu = gpu_for_capacity(prof, measured["kv_blocks"] * 16)
    w = measured["workload"]
    spec = WorkloadSpec(rate=1.0, dataset=None, input_lengths=LengthHistogram(**w["input"]),
                        output_lengths=LengthHistogram(**w["output"]))
    slo = (measured["slo"]["ttft_s"], measured["slo"]["tpot_s"])
    budget, link = measured["prefill_token_budget"], kv_link(prof)
    modes, goodput = {}, {}
    engine = model_for(prof, gpu, None)
    for mode, res in measured["modes"].items():
        latency = model_for(prof, gpu, mode)
        points = []
        for p in res["points"]:
            trace = sample_requests(spec.model_copy(update={"rate": p["rate"]}), p["rate"], w["requests_per_rate"],
                                    w["seed"])
            sim = simulate(mode, latency, trace, budget, link)
            engine_only = simulate(mode, engine, trace, budget, link)
            points.append({**p, "engine_only_tpot_p50": float(np.median(engine_only.tpots)),
                           "tpot_p50_over_engine": engine_tpot_ratio(p["measured_tpot_p50"], engine_only),
                           "predicted": sim.attainment(*slo), "predicted_ttft_p50": float(np.median(sim.ttfts)),
                           "predicted_tpot_p50": float(np.median(sim.tpots)), "predicted_ttft_p90": sim.p90_ttft,
                           "predicted_tpot_p90": sim.p90_tpot, "predicted_band": [], "band_step_error": None})
        served = prof.served.get(mode)
        modes[mode] = {"served_overhead": served.model_dump(mode="json", exclude={"probes"}) if served else {},
                       "points": points}
        goodput[mode] = predicted_goodput(mode, latency, spec, slo, budget, link, n=w["requests_per_rate"])
    return {
        "benchmark": "predicted_vs_measured (re-simulated)", "goal": measured["goal"],
        "summary": summary_of(modes, goodput), "device": measured["device"], "shape": measured["shape"],
        "measured_run": {k: measured[k] for k in ("device", "machine", "fits", "predicted_goodput_rps")},
        "profile_created": prof.created.isoformat(), "profile_device": prof.device,
        "fits": {"prefill": vars(engine.prefill_fits[(1, 1)]), "decode": vars(engine.decode_fits[(1, 1)])},
        "workload": w, "slo": measured["slo"], "prefill_token_budget": budget, "kv_blocks": measured["kv_blocks"],
        "predicted_goodput_rps": goodput, "modes": modes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a predicted_vs_measured JSON (its measurements are kept)")
    parser.add_argument("--profile", type=Path, required=True, help="the latency profile to predict from")
    parser.add_argument("--out", type=Path, help="JSON path (default: <result>-resimulated.json)")
    args = parser.parse_args()
    doc = resimulate(json.loads(args.result.read_text()), LatencyProfile.load(args.profile))
    print(f"{'mode':>13} {'rate':>7} {'measured':>9} {'predicted':>10} {'gap pts':>8} {'TPOT p50 pred/meas ms':>22}")
    for mode, res in doc["modes"].items():
        for p in res["points"]:
            print(f"{mode:>13} {p['rate']:7.2f} {p['measured']:9.1%} {p['predicted']:10.1%} "
                  f"{100 * (p['predicted'] - p['measured']):+8.1f} "
                  f"{p['predicted_tpot_p50'] * 1e3:10.2f}/{p['measured_tpot_p50'] * 1e3:.2f}")
        print(f"{mode}: max |gap| {doc['summary'][mode]['max_abs_gap_pts']:.1f} pts, predicted goodput "
              f"{doc['predicted_goodput_rps'][mode]:.2f} req/s")
    out = args.out or args.result.with_name(args.result.stem + "-resimulated.json")
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
