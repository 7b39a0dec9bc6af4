"""Simulator vs runtime under KV preemption: one trace, one profile, both run it (CPU).

The colocated worker (disagg_runtime/workers/colocated.py, its real scheduler and engine, stepped on this
thread with wall-clock arrivals) serves a trace whose KV cache is too small for its load, so the engine
preempts; the planner's colocated simulator runs the same trace on a latency model fitted to a profile of
the same engine, with the same block size, watermark and preemption policy. Compared: the number of
preemptions, and the TPOT distribution (mean, p50, p90, p99, and the largest gap between the two
empirical CDFs, the Kolmogorov-Smirnov distance).

    python bench/preemption_sim_vs_runtime.py [--blocks 64] [--num-requests 40] [--rate 50]

Writes bench/results/preemption_sim_vs_runtime-cpu.json (with a `summary`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from disagg_planner import simulator as sim
from disagg_planner.api import GPU_PRESETS, GPUSpec, LatencyProfile, LengthHistogram, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.latency.memory import workspace_bytes
from disagg_planner.latency.shape import stage_shape
from disagg_planner.workloads import SimRequest, sample_requests

sys.path.insert(0, str(Path(__file__).parent))
from predicted_vs_measured import adjusted, profile, write_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BLOCK = 16


def gpu_holding(prof: LatencyProfile, tokens: int, mem_util: float) -> GPUSpec:
    """The profile's GPU type with the memory at which the simulated KV capacity is exactly `tokens`."""
    stage = stage_shape(prof.model, 1, 1)
    need = (tokens + 0.5) * stage.kv_bytes_per_token + stage.weight_bytes + workspace_bytes(prof.model, 1)
    base = GPU_PRESETS.get(prof.gpu) or GPU_PRESETS["CPU"]
    return base.model_copy(update={"name": prof.gpu, "memory_gib": need / (mem_util * 2**30)})


def trace_of(n: int, rate: float, seed: int, inputs: LengthHistogram, outputs: LengthHistogram) -> list[SimRequest]:
    spec = WorkloadSpec(rate=rate, dataset=None, input_lengths=inputs, output_lengths=outputs)
    return sample_requests(spec, rate, n, seed)


async def serve_trace(model_dir: Path, blocks: int, budget: int, trace: list[SimRequest], watermark: float,
                      preemption: str) -> dict:
    """Run the trace on a colocated worker driven step by step here; per-request TTFT/TPOT and preemptions."""
    from disagg_runtime.engine import Engine
    from disagg_runtime.workers.base import WorkerConfig
    from disagg_runtime.workers.colocated import ColocatedWorker
    from disagg_runtime.workers.protocol import PrefillRequest, SamplingSpec
    from disagg_runtime.workers.relay import TokenLog

    engine = Engine.load(model_dir, device="cpu", num_blocks=blocks, block_size=BLOCK, kv_watermark=watermark,
                         preemption=preemption)
    worker = ColocatedWorker(engine, WorkerConfig(prefill_token_budget=budget, max_queue=len(trace)))
    worker.loop = asyncio.get_running_loop()
    sink = TokenLog()
    times = [[] for _ in trace]
    steps = []  # (running batch, summed context, seconds) of each decode step
    prefills = []  # seconds of each prefill step
    stepping = 0.0  # seconds inside worker steps (the rest is this loop and idle waits)
    vocab = engine.config.vocab_size
    start = time.perf_counter()
    nxt = 0
    while nxt < len(trace) or worker.jobs:
        now = time.perf_counter() - start
        while nxt < len(trace) and trace[nxt].arrival <= now:
            r = trace[nxt]
            ids = [(7 * nxt + 3 * k) % (vocab - 4) + 4 for k in range(r.input_len)]
            msg = PrefillRequest(request_id=f"r{nxt}", prompt_ids=ids,
                                 sampling=SamplingSpec(max_tokens=r.output_len, ignore_eos=True))
            assert worker._enqueue(worker._job(msg, ids, sink))
            nxt += 1
        batch = [s for s in engine._seqs.values() if s.decodable and not s.preempted and not s.finished]
        prefill_next = bool(worker._waiting) and engine.can_admit(len(worker._waiting[0].request.prompt_ids))
        context = sum(s.num_cached + 1 for s in batch)
        began = time.perf_counter()
        stepped = worker._step()
        if batch and not prefill_next and stepped:
            steps.append((len(batch), context, time.perf_counter() - began))
        elif prefill_next and stepped:
            prefills.append(time.perf_counter() - began)
        stepping += time.perf_counter() - began
        if not stepped:
            if nxt < len(trace):
                await asyncio.sleep(max(0.0, trace[nxt].arrival - (time.perf_counter() - start)))
            continue
        await asyncio.sleep(0)  # deliver this step's tokens
        stamp = time.perf_counter() - start
        for i in range(nxt):
            times[i] += [stamp] * (len(sink.tokens.get(f"r{i}", ())) - len(times[i]))
    ttft = [t[0] - r.arrival for t, r in zip(times, trace, strict=True)]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0 for t in times]
    assert all(len(t) == r.output_len for t, r in zip(times, trace, strict=True)), "a request lost tokens"
    stats = engine.preemption_stats
    return {"ttft": ttft, "tpot": tpot, "preemptions": stats.preemptions, "swapped_tokens": stats.swapped_tokens,
            "recomputed_tokens": stats.recomputed_tokens, "wall_s": time.perf_counter() - start, "steps": steps,
            "prefill_s": prefills, "stepping_s": stepping}


def distribution(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def ks_distance(a: list[float], b: list[float]) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", help="model shape of predicted_vs_measured.SHAPES")
    parser.add_argument("--blocks", type=int, default=64, help="KV blocks of 16 tokens (small: forces preemption)")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=50.0, help="req/s (Poisson)")
    parser.add_argument("--watermark", type=float, default=0.01)
    parser.add_argument("--preemption", choices=["swap", "recompute"], default="swap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "disagg" / "bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "preemption_sim_vs_runtime-cpu.json")
    args = parser.parse_args()

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    model_dir = write_model(args.shape, args.cache_dir)
    inputs = LengthHistogram(edges=[16, 65], counts=[1.0])
    outputs = LengthHistogram(edges=[60, 241], counts=[1.0])
    budget = 512
    trace = trace_of(args.num_requests, args.rate, args.seed, inputs, outputs)
    whole_life = args.blocks // -(-(64 + 240 - 1) // BLOCK)

    # One profile: enough blocks for the profiler's grid (its own engine), then the simulated capacity is ours.
    prof = profile(model_dir, "cpu", 2048, budget, inputs, outputs, tpot_factor=3.0, max_decode_batch=32)
    latency = LatencyModel.from_profile(prof, gpu_holding(prof, args.blocks * BLOCK, 0.9), intra_node_gbps=100.0)
    policy = sim.KVPolicy(block_size=BLOCK, watermark=args.watermark, preemption=args.preemption)
    simulated = sim.simulate_colocated(sim.ColocatedConfig(sim.PhaseShape(1, 1, 1), budget, 0.9, policy),
                                       latency, trace)
    assert simulated.kv_capacity_tokens // BLOCK == args.blocks, simulated.kv_capacity_tokens

    measured = asyncio.run(serve_trace(model_dir, args.blocks, budget, trace, args.watermark, args.preemption))
    # How far the profile's step times are from the steps this run took (load on a shared CPU moves them):
    # the simulation rerun with the profile scaled by that ratio separates schedule error from step-time error.
    # The ratio of totals, not a median: on a loaded machine a few steps are descheduled for long, and TPOT
    # (a mean over a request's steps) pays for them.
    predicted = [latency.decode_time(1, 1, b, round(ctx / b)) for b, ctx, _ in measured["steps"]]
    ratios = [sec / p for (_, _, sec), p in zip(measured["steps"], predicted, strict=True)]
    scale = sum(x[2] for x in measured["steps"]) / sum(predicted) if predicted else 1.0
    scaled = LatencyModel.from_profile(adjusted(prof, scale=scale), latency.gpu, intra_node_gbps=100.0)
    calibrated = sim.simulate_colocated(sim.ColocatedConfig(sim.PhaseShape(1, 1, 1), budget, 0.9, policy),
                                        scaled, trace)
    sim_tpot = simulated.tpots.tolist()
    sim_ttft = simulated.ttfts.tolist()
    doc = {
        "benchmark": "preemption_sim_vs_runtime", "device": "cpu", "shape": args.shape, "kv_blocks": args.blocks,
        "block_size": BLOCK, "watermark": args.watermark, "preemption": args.preemption,
        "prefill_token_budget": budget, "requests": args.num_requests, "rate_rps": args.rate, "seed": args.seed,
        "workload": {"input": inputs.model_dump(), "output": outputs.model_dump()},
        "whole_life_reservation_would_run": whole_life,
        "load_avg": {"start": load_start, "end": os.getloadavg()}, "cores": os.cpu_count(),
        "runtime": {"preemptions": measured["preemptions"], "swapped_tokens": measured["swapped_tokens"],
                    "recomputed_tokens": measured["recomputed_tokens"], "tpot_s": distribution(measured["tpot"]),
                    "ttft_s": distribution(measured["ttft"]), "wall_s": measured["wall_s"],
                    "seconds_in_steps": measured["stepping_s"], "decode_steps": len(measured["steps"]),
                    "decode_step_s_total": sum(x[2] for x in measured["steps"]),
                    "prefill_steps": len(measured["prefill_s"]), "prefill_step_s_total": sum(measured["prefill_s"])},
        "simulator": {"preemptions": simulated.preemptions, "preempted_tokens": simulated.preempted_tokens,
                      "tpot_s": distribution(sim_tpot), "ttft_s": distribution(sim_ttft),
                      "peak_kv_tokens": simulated.peak_kv_tokens[0]},
        "step_time_ratio_measured_over_profile": {"total": scale, "median": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
                                                  "p90": float(np.percentile(ratios, 90)), "steps": len(ratios)},
        "simulator_scaled_profile": {"preemptions": calibrated.preemptions,
                                     "tpot_s": distribution(calibrated.tpots.tolist()),
                                     "ttft_s": distribution(calibrated.ttfts.tolist())},
        "tpot_ks_distance": ks_distance(measured["tpot"], sim_tpot),
        "tpot_ks_distance_scaled_profile": ks_distance(measured["tpot"], calibrated.tpots.tolist()),
        "per_request": {"runtime_tpot_s": measured["tpot"], "simulated_tpot_s": sim_tpot},
    }
    rt, sm = doc["runtime"], doc["simulator"]
    gap = {q: (sm["tpot_s"][q] - rt["tpot_s"][q]) / rt["tpot_s"][q] * 100 for q in ("mean", "p50", "p90", "p99")}
    doc["tpot_gap_pct"] = gap
    cs = doc["simulator_scaled_profile"]
    cgap = {q: (cs["tpot_s"][q] - rt["tpot_s"][q]) / rt["tpot_s"][q] * 100 for q in ("mean", "p50", "p90", "p99")}
    doc["tpot_gap_pct_scaled_profile"] = cgap
    doc["summary"] = (
        f"{args.num_requests} requests at {args.rate:g} req/s on {args.blocks} KV blocks of {BLOCK} "
        f"({args.preemption}, watermark {args.watermark:g}): preemptions runtime {rt['preemptions']} vs simulator "
        f"{sm['preemptions']}; TPOT mean {rt['tpot_s']['mean'] * 1e3:.2f} vs {sm['tpot_s']['mean'] * 1e3:.2f} ms "
        f"({gap['mean']:+.0f}%), p90 {rt['tpot_s']['p90'] * 1e3:.2f} vs {sm['tpot_s']['p90'] * 1e3:.2f} ms "
        f"({gap['p90']:+.0f}%); KS distance of the TPOT distributions {doc['tpot_ks_distance']:.2f}. The run's "
        f"decode steps took {scale:.2f}x the profile's (load average {load_start[0]:.1f} at start); with the "
        f"profile scaled by that: preemptions {cs['preemptions']}, TPOT mean {cs['tpot_s']['mean'] * 1e3:.2f} ms "
        f"({cgap['mean']:+.0f}%), p90 {cs['tpot_s']['p90'] * 1e3:.2f} ms ({cgap['p90']:+.0f}%), KS distance "
        f"{doc['tpot_ks_distance_scaled_profile']:.2f}")
    print(f"{'':18} {'preemptions':>12} {'TPOT mean':>10} {'p50':>8} {'p90':>8} {'p99':>8}  (ms)")
    for name, part in (("runtime", rt), ("simulator", sm), ("simulator, scaled", cs)):
        t = part["tpot_s"]
        print(f"{name:18} {part['preemptions']:>12} {t['mean'] * 1e3:>10.2f} {t['p50'] * 1e3:>8.2f} "
              f"{t['p90'] * 1e3:>8.2f} {t['p99'] * 1e3:>8.2f}")
    print(doc["summary"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
