"""Planner's predicted SLO attainment vs measured, disaggregated (1 prefill + 1 decode) and colocated (1 instance).

Design goal (design.md §5): simulator within 2 points of measured attainment (paper: ~2%). Steps:
  1. write a random model of `--shape`, profile its engine here (grid sized to the workload and SLO);
  2. profile the served path of each mode (disagg_runtime.served_profiler, what `disagg profile --served`
     runs): the per-request and per-step overheads of the router, workers and relay, and the KV hand-off,
     go into the profile's `served` section, which `LatencyModel.from_profile(..., served_mode=mode)` adds
     to every simulated step; the simulated KV capacity is the engines' cache;
  3. workload: chatbot lengths scaled to the model's context (+-8% of the scaled means); SLOs are multiples
     of the engine's profiled step times; each mode's rates bracket its predicted goodput;
  4. per mode, serve the model as processes (`LocalCluster`, i.e. `disagg serve --local [--colocated]`),
     replay each rate's trace with the bench client and simulate the same trace.
Prints a table and writes bench/results/predicted_vs_measured-<device>-<shape>.json.

    python bench/predicted_vs_measured.py                              # CPU, small model
    python bench/predicted_vs_measured.py --device cuda --shape llama-8b   # one or two GPUs

With two GPUs visible, prefill and decode workers get one each; with one, they share it (recorded in the
JSON, and the disaggregated prediction, which assumes separate GPUs, then does not apply). On CPU the
prefill and decode workers are pinned to cores of their own and the router to the prefill worker's (`--cpu-affinity`,
default prefill=0,decode=1,router=0): unpinned, the router took its CPU from the decode core too, and the
decode steps slowed with the rate (a 21-point gap at the knee, against 2 pinned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
from disagg_planner import simulator as sim
from disagg_planner.api import (
    GPU_PRESETS,
    DecodeOverheadPoint,
    GPUSpec,
    LatencyProfile,
    LengthHistogram,
    WorkloadSpec,
)
from disagg_planner.latency import LatencyModel
from disagg_planner.latency.memory import workspace_bytes
from disagg_planner.latency.shape import stage_shape
from disagg_planner.workloads import SimRequest, sample_requests
from disagg_runtime.benchclient.client import RequestRecord, run_trace
from disagg_runtime.benchclient.report import summarize
from disagg_runtime.serve.affinity import parse_cpu_affinity
from disagg_runtime.serve.local import LocalCluster
from disagg_runtime.served_profiler import decode_by_batch_text
from disagg_runtime.workers.step_trace import read_steps
from pvm_dump import dump_requests
from pvm_steps import PrefillCounter, step_accounting, steps_text

RESULTS = Path(__file__).parent / "results"
MEM_UTIL = 0.9
TARGET = 0.9
LOAD_FACTOR = 0.8  # the served profiler's loaded probe, as a share of the bare engine's predicted goodput
CHATBOT_MEANS = (763, 176)  # DistServe's ShareGPT trace (context 2048)
ONE = sim.PhaseShape(1, 1, 1)

# name -> HF config overrides for write_random_model (float32 unless torch_dtype says otherwise).
SHAPES: dict[str, dict] = {
    "tiny": {},  # the test model: 2 layers, hidden 64, context 512
    "cpu-small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 1024},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                 "max_position_embeddings": 4096, "torch_dtype": "bfloat16"},
    # Llama-3-8B; a 2048-token context holds DistServe's chatbot lengths (763 in, 176 out) unscaled.
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "max_position_embeddings": 2048, "rope_theta": 500000.0, "torch_dtype": "bfloat16"},
}


# ---- model, profile, latency model ----------------------------------------------------------------
def write_model(shape: str, cache: Path) -> Path:
    from disagg_runtime.models.testing import write_random_model

    target = cache / f"pvm-{shape}"
    if not (target / "config.json").is_file():
        write_random_model(target, seed=0, **SHAPES[shape])
    return target


def workload(max_context: int) -> tuple[LengthHistogram, LengthHistogram]:
    """Chatbot means scaled to the context (2048 in DistServe's trace), +-8% uniform around them."""
    scale = min(1.0, max_context / 2048)

    def around(mean: float) -> LengthHistogram:
        m = max(4, round(mean * scale))
        half = max(1, round(0.08 * m))
        return LengthHistogram(edges=[m - half, m + half + 1], counts=[1.0])

    return around(CHATBOT_MEANS[0]), around(CHATBOT_MEANS[1])


def profile(model_dir: Path, device: str, blocks: int, budget: int, inputs: LengthHistogram,
            outputs: LengthHistogram, tpot_factor: float, max_decode_batch: int) -> LatencyProfile:
    """Prefill over the workload's prompt lengths and batches the budget allows; decode over its contexts,
    doubling the batch until a step takes twice the TPOT SLO (larger batches cannot attain, and CPU
    decode grows super-linearly there, which would bend the linear fit where it matters)."""
    import torch
    from disagg_runtime.engine import Engine
    from disagg_runtime.profiler import decode_step_batches, profile_engine

    engine = Engine.load(model_dir, device=device, num_blocks=blocks)
    lo, hi = inputs.edges[0], inputs.max
    lengths = sorted({max(1, lo // 2), lo, hi, min(2 * hi, engine.max_context - 2)})
    batches = [b for b in (1, 2, 4, 8, 16) if b == 1 or b * lo <= 2 * budget]
    contexts = sorted({lo, (lo + hi + outputs.max) // 2, hi + outputs.max})
    result = profile_engine(engine, prefill_lengths=lengths, prefill_batches=batches, decode_batches=[1],
                            contexts=contexts, repeats=3)
    decode = list(result.shapes[0].decode)
    limit = 2 * tpot_factor * float(np.median([s.seconds for s in decode]))
    # The batches decode steps run at (an engine with CUDA graphs pads a step to one), else powers of two.
    sizes = [b for b in decode_step_batches(engine) if b > 1] or [2**k for k in range(1, 20)]
    for batch in (b for b in sizes if b <= max_decode_batch):
        try:
            part = profile_engine(engine, prefill_lengths=[lo], prefill_batches=[1], decode_batches=[batch],
                                  contexts=contexts, repeats=3, warmup_tokens=0).shapes[0].decode  # warm already
        except RuntimeError:  # no context fits the KV cache at this batch
            break
        decode += part
        if float(np.median([s.seconds for s in part])) > limit:
            break
    del engine
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    shape = result.shapes[0].model_copy(update={"decode": decode})
    return result.model_copy(update={"shapes": [shape]})


def gpu_for_capacity(prof: LatencyProfile, tokens: int) -> GPUSpec:
    """The profile's GPU type with the memory at which the simulated KV capacity equals `tokens`."""
    model = prof.model
    need = tokens * stage_shape(model, 1, 1).kv_bytes_per_token + stage_shape(model, 1, 1).weight_bytes
    need += workspace_bytes(model, 1)
    base = GPU_PRESETS.get(prof.gpu) or GPU_PRESETS["H100-80GB"]
    return base.model_copy(update={"name": prof.gpu, "memory_gib": need * 1.0001 / (MEM_UTIL * 2**30)})


def adjusted(prof: LatencyProfile, *, scale: float = 1.0) -> LatencyProfile:
    """The profile with every engine step scaled by `scale` (the served-path section is kept as measured)."""
    shape = prof.shapes[0]
    prefill = [s.model_copy(update={"seconds": s.seconds * scale}) for s in shape.prefill]
    decode = [s.model_copy(update={"seconds": s.seconds * scale}) for s in shape.decode]
    return prof.model_copy(update={"shapes": [shape.model_copy(update={"prefill": prefill, "decode": decode})]})


def profile_served_path(prof: LatencyProfile, model_dir: Path, modes: list[str], worker_args: list[str],
                        devices: dict[str, str], affinity: dict[str, set[int]], inputs: LengthHistogram,
                        outputs: LengthHistogram, load_rate: float | None, load_requests: int) -> LatencyProfile:
    """The profile with each mode's served-path overheads, measured by the profiler's served mode at the
    workload's lengths and the profile's decode batches, on deployments started as the sweep's are; the
    colocated one also under a Poisson load of `load_requests` at `load_rate` (its own seed, not one of the
    sweep's traces)."""
    from disagg_runtime.served_profiler import ServedProbePlan, profile_served

    mean_in = round(inputs.mean)
    # Powers of two: the served overhead is host work per row, smooth in the batch (interpolated between).
    batches = sorted({s.batch_size for s in prof.shapes[0].decode if s.batch_size & (s.batch_size - 1) == 0})
    plan = ServedProbePlan(prompt_tokens=[mean_in, max(1, mean_in // 4)], output_tokens=round(outputs.mean),
                           decode_batches=batches, load_rate=load_rate, load_requests=load_requests)
    return profile_served(model_dir, prof, modes, plan, worker_args=worker_args, role_args=role_devices(devices),
                          cpu_affinity=affinity, log=lambda msg: print(msg, flush=True))


# ---- simulation -------------------------------------------------------------------------------------
def simulate(mode: str, latency: LatencyModel, trace: list[SimRequest], budget: int,
             link_gbps: float) -> sim.SimResult:
    if mode == "colocated":
        return sim.simulate_colocated(sim.ColocatedConfig(ONE, budget, MEM_UTIL), latency, trace)
    return sim.simulate_disaggregated(sim.DisaggConfig(ONE, ONE, link_gbps, budget, MEM_UTIL), latency, trace)


def predicted_goodput(mode: str, latency: LatencyModel, spec: WorkloadSpec, slo: tuple[float, float],
                      budget: int, link_gbps: float, n: int = 600) -> float:
    """Highest rate with simulated attainment >= TARGET (bisection; the trace is rescaled per rate)."""
    base = sample_requests(spec, 1.0, n, seed=1)

    def ok(rate: float) -> bool:
        trace = [SimRequest(r.arrival / rate, r.input_len, r.output_len) for r in base]
        return simulate(mode, latency, trace, budget, link_gbps).attainment(*slo) >= TARGET

    lo, hi = 0.0, 1.0
    while ok(hi) and hi < 1e5:
        lo, hi = hi, hi * 2
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# ---- measurement ------------------------------------------------------------------------------------
def replay(url: str, trace: list[SimRequest]):
    return asyncio.run(run_trace(url, trace, model=None, prompt_mode="ids", timeout=900))


def engine_tpot_ratio(measured_tpot_p50: float | None, engine_only: sim.SimResult) -> float | None:
    """Measured TPOT p50 over the TPOT p50 of the same trace simulated on the bare engine (the profile
    without its served-path overheads): the same batches, and in a colocated instance the same prefill
    steps between a request's tokens, with nothing added by the router, the workers or the relay. This is
    what "as fast as its engine" is judged by (`summary.<mode>.tpot_p50_over_engine`)."""
    engine_p50 = float(np.median(engine_only.tpots)) if len(engine_only.tpots) else 0.0
    return None if not measured_tpot_p50 or engine_p50 <= 0 else measured_tpot_p50 / engine_p50


def engine_step_ratio(records: list[RequestRecord], engine: LatencyModel, mean_context: float) -> float | None:
    """Measured TPOT p50 over the engine's decode step alone at the decode batches the requests saw.

    A request's gap between two tokens is charged the engine's decode step at the batch decoding then (the
    requests between their first and last tokens, as the client saw them), at the mean context. Prefill
    steps between the tokens are not charged, so in a colocated instance this ratio grows with the rate
    even when serving adds nothing (see `engine_tpot_ratio`).
    """
    done = [r for r in records if r.ok and len(r.token_times) > 1]
    if not done:
        return None
    firsts = np.sort([r.token_times[0] for r in done])
    lasts = np.sort([r.token_times[-1] for r in done])
    engine_tpots = []
    for r in done:
        mids = (np.asarray(r.token_times[1:]) + np.asarray(r.token_times[:-1])) / 2
        batch = np.maximum(1, np.searchsorted(firsts, mids, side="right") - np.searchsorted(lasts, mids, side="right"))
        engine_tpots.append(float(np.mean([engine.decode_time(1, 1, int(b), int(b * mean_context)) for b in batch])))
    return float(median(r.tpot for r in done)) / median(engine_tpots)


def wait_for_quiet(max_load: float | None, patience_s: float = 300.0) -> float:
    """On a shared machine, wait (up to `patience_s`) until the 1-minute load average is below `max_load`."""
    start = time.monotonic()
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() - start < patience_s:
        time.sleep(5)
    return time.monotonic() - start


def role_devices(devices: dict[str, str]) -> dict[str, list[str]]:
    return {r: ["--device", d] for r, d in devices.items()}


def start_cluster(mode: str, model_dir: Path, worker_args: list[str], devices: dict[str, str],
                  affinity: dict[str, set[int]]) -> LocalCluster:
    cluster = LocalCluster(model_dir=model_dir, port=0, colocated_workers=1 if mode == "colocated" else 0,
                           worker_args=worker_args, role_args=role_devices(devices), cpu_affinity=affinity,
                           startup_timeout_s=600)
    cluster.start()
    return cluster


# ---- the run --------------------------------------------------------------------------------------
def worker_args_of(args) -> list[str]:
    return ["--num-kv-blocks", str(args.blocks), "--prefill-token-budget", str(args.budget), "--max-queue", "4096",
            "--max-batch", "512"]


def model_for(prof: LatencyProfile, gpu: GPUSpec, mode: str | None) -> LatencyModel:
    """The planner's model of `prof`: with `mode`, plus that mode's served-path overheads; None: engine only."""
    if mode is None:
        prof = prof.model_copy(update={"served": {}})
    return LatencyModel.from_profile(prof, gpu, intra_node_gbps=100.0, served_mode=mode)


def run_mode(mode: str, args, model_dir: Path, prof: LatencyProfile, latency: LatencyModel, engine: LatencyModel,
             spec: WorkloadSpec, slo: tuple[float, float], rates: list[float], devices: dict[str, str],
             link_gbps: float, affinity: dict[str, set[int]]) -> dict:
    inputs, outputs = spec.input_lengths, spec.output_lengths
    mean_context = inputs.mean + outputs.mean / 2
    trace_dir = Path(tempfile.mkdtemp(prefix=f"pvm-steps-{mode}-"))
    cluster = start_cluster(mode, model_dir, worker_args_of(args) + ["--step-trace", str(trace_dir)], devices,
                            affinity)
    try:
        replay(cluster.url, [SimRequest(0.01 * k, round(inputs.mean), round(outputs.mean)) for k in range(4)])
        # How far the prediction moves if every step is off by the fits' RMS error: near the knee of the
        # attainment curve a few percent of step time move attainment by tens of points.
        err = max(f.rms_relative_error for f in (latency.prefill_fits[(1, 1)], latency.decode_fits[(1, 1)]))
        slower, faster = (model_for(adjusted(prof, scale=1 + e), latency.gpu, mode) for e in (err, -err))
        points = []
        for rate in rates:
            trace = sample_requests(spec.model_copy(update={"rate": rate}), rate, args.num_requests, args.seed)
            waited = wait_for_quiet(args.quiet_load)
            load_before = os.getloadavg()[0]
            window_start = time.time()
            records = replay(cluster.url, trace)
            window_end = time.time()
            measured = summarize(records, rate=rate, ttft_slo=slo[0], tpot_slo=slo[1])
            counter = PrefillCounter(latency)
            raw = simulate(mode, counter.model, trace, args.budget, link_gbps)
            engine_only = simulate(mode, engine, trace, args.budget, link_gbps)
            points.append({
                "rate": rate, "measured": measured.attainment, "predicted": raw.attainment(*slo),
                "ok": measured.ok, "errors": measured.errors,
                "predicted_band": [simulate(mode, m, trace, args.budget, link_gbps).attainment(*slo)
                                   for m in (slower, faster)], "band_step_error": err,
                "measured_ttft_p50": measured.ttft_p50, "measured_tpot_p50": measured.tpot_p50,
                "measured_ttft_p90": measured.ttft_p90, "measured_tpot_p90": measured.tpot_p90,
                "predicted_ttft_p50": float(np.median(raw.ttfts)), "predicted_tpot_p50": float(np.median(raw.tpots)),
                "predicted_ttft_p90": raw.p90_ttft, "predicted_tpot_p90": raw.p90_tpot,
                "engine_only_tpot_p50": float(np.median(engine_only.tpots)),
                "tpot_p50_over_engine": engine_tpot_ratio(measured.tpot_p50, engine_only),
                "tpot_p50_over_engine_step": engine_step_ratio(records, engine, mean_context),
                "load_avg_1m_before": load_before, "load_avg_1m": os.getloadavg()[0], "waited_for_quiet_s": waited,
                "steps": step_accounting(list(read_steps(trace_dir)), window_start, window_end, engine, latency,
                                         counter),
            })
            if args.dump:
                dump_requests(args.dump / f"{mode}-{rate:g}.json", trace, records, raw)
            ratio = points[-1]["tpot_p50_over_engine"]
            print(f"  {mode:>13} {rate:7.2f} req/s: measured {measured.attainment:6.1%}  predicted "
                  f"{points[-1]['predicted']:6.1%}  TPOT p50 / engine's {ratio or float('nan'):.2f}  "
                  f"load {points[-1]['load_avg_1m']:.2f}", flush=True)
            print(f"  {'':>13} steps: {steps_text(points[-1]['steps'])}", flush=True)
    finally:
        cluster.stop()
        if args.dump:
            shutil.copytree(trace_dir, args.dump / f"{mode}-steps", dirs_exist_ok=True)
    return {"served_overhead": prof.served[mode].model_dump(mode="json", exclude={"probes"}),
            "kv_link_gbps": link_gbps if mode == "disaggregated" else None, "points": points}


def summary_of(modes: dict[str, dict], goodput: dict[str, float]) -> dict:
    """The top-level `summary`: per mode, the worst gap and the per-point figures it comes from."""
    out = {}
    for mode, res in modes.items():
        pts = res["points"]
        out[mode] = {
            "max_abs_gap_pts": max(abs(p["predicted"] - p["measured"]) for p in pts) * 100,
            "predicted_goodput_rps": goodput[mode], "rates": [p["rate"] for p in pts],
            "measured_attainment": [p["measured"] for p in pts], "predicted_attainment": [p["predicted"] for p in pts],
            "load_avg_1m": [p["load_avg_1m"] for p in pts],
            "tpot_p50_over_engine": [p.get("tpot_p50_over_engine") for p in pts],
            "tpot_p50_over_engine_step": [p["tpot_p50_over_engine_step"] for p in pts],
            "served_overhead": res["served_overhead"],
        }
    return out


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ttft, tpot = doc["slo"]["ttft_s"], doc["slo"]["tpot_s"]
    table = Table(title=f"predicted vs measured SLO attainment ({doc['device']}, {doc['shape']}; TTFT <= "
                        f"{ttft * 1e3:.1f} ms, TPOT <= {tpot * 1e3:.2f} ms)")
    for col in ("mode", "rate req/s", "predicted", "band (fit err)", "measured", "gap (pts)",
                "TTFT p50 pred/meas ms", "TPOT p50 pred/meas ms", "TPOT/engine", "TPOT/decode step", "load 1m"):
        table.add_column(col, justify="right")
    for mode, res in doc["modes"].items():
        for p in res["points"]:
            band = "-".join(f"{100 * x:.0f}" for x in p["predicted_band"]) + f"% (±{100 * p['band_step_error']:.0f}%)"
            ratio, engine_ratio = p["tpot_p50_over_engine_step"], p.get("tpot_p50_over_engine")
            table.add_row(mode, f"{p['rate']:.2f}", f"{p['predicted']:.1%}", band, f"{p['measured']:.1%}",
                          f"{100 * (p['predicted'] - p['measured']):+.1f}",
                          f"{p['predicted_ttft_p50'] * 1e3:.1f}/{(p['measured_ttft_p50'] or 0) * 1e3:.1f}",
                          f"{p['predicted_tpot_p50'] * 1e3:.2f}/{(p['measured_tpot_p50'] or 0) * 1e3:.2f}",
                          "-" if engine_ratio is None else f"{engine_ratio:.2f}",
                          "-" if ratio is None else f"{ratio:.2f}", f"{p['load_avg_1m']:.2f}")
    console = Console(width=200)
    console.print(table)
    for mode, summ in doc["summary"].items():
        o = summ["served_overhead"]
        handoff = f", KV hand-off +{o['kv_handoff_s'] * 1e3:.2f} ms" if o.get("kv_handoff_s") is not None else ""
        by_batch = [DecodeOverheadPoint.model_validate(p) for p in o.get("decode_by_batch") or []]
        table = f" ({decode_by_batch_text(by_batch)})" if by_batch else ""
        behind = (f", prefill behind decode {o['prefill_behind_decode_s'] * 1e3:+.2f} ms"
                  if o.get("prefill_behind_decode_s") is not None else "")
        console.print(f"{mode}: served-path overhead in the profile: prefill +{o['prefill_s'] * 1e3:.2f} ms/request, "
                      f"decode step +{o['decode_step_s'] * 1e3:.2f} ms + {o['decode_per_seq_s'] * 1e3:.3f} ms/sequence"
                      f"{table}{behind}{handoff}; max |gap| {summ['max_abs_gap_pts']:.1f} pts")


def kv_link(prof: LatencyProfile) -> float:
    """The pulls' bandwidth the served probes saw. Where their gaps did not grow with the prompt, the whole
    hand-off is in the profile's fixed `kv_handoff_s`, so the link adds nothing (a very fast one)."""
    served = prof.served.get("disaggregated")
    return (served.kv_link_gbps if served is not None else None) or 1e3


def bracket(goodput: float, factors: list[float]) -> list[float]:
    return [round(goodput * f, 2) for f in factors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: cpu-small on CPU, "
                        "llama-8b on cuda)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads per process")
    parser.add_argument("--blocks", type=int, help="KV blocks of 16 tokens per engine (default 2048 on CPU, "
                        "16384 on a GPU)")
    parser.add_argument("--budget", type=int, help="prefill token budget (default 4x the mean prompt)")
    parser.add_argument("--num-requests", type=int, help="requests per rate (default 150 on CPU, 600 on a GPU, "
                        "where a 150-request trace at the knee lasts ~6 s, about two requests' lives: most of its "
                        "requests then see the load ramp up or down rather than the rate itself)")
    parser.add_argument("--dump", type=Path, help="write each rate's per-request measured and predicted latencies "
                        "and the workers' step traces into this directory")
    parser.add_argument("--rates", type=float, nargs="*", help="req/s for every mode (default: --rate-factors of "
                        "each mode's predicted goodput)")
    parser.add_argument("--rate-factors", type=float, nargs="*", default=[0.5, 0.75, 0.9, 1.1, 1.3],
                        help="default rates as multiples of each mode's predicted goodput")
    parser.add_argument("--ttft-factor", type=float, default=4.0, help="TTFT SLO / one prompt's prefill time")
    parser.add_argument("--tpot-factor", type=float, default=3.0, help="TPOT SLO / a batch-1 decode step")
    parser.add_argument("--modes", nargs="*", default=["colocated", "disaggregated"],
                        choices=["colocated", "disaggregated"])
    parser.add_argument("--cpu-affinity", type=parse_cpu_affinity, help="CPU: pin the workers to cores (default "
                        "prefill=0,decode=1,router=0 with 2+ cores: prefill and decode each get their own, as on two GPUs, and "
                        "the router shares the prefill core)")
    parser.add_argument("--quiet-load", type=float, help="before each rate, wait (<= 5 min) for the 1-minute load "
                        "average to drop below this (default 0.8 on CPU: other jobs skew CPU step times)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "disagg" / "bench")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/predicted_vs_measured-<device>-<shape>.json)")
    args = parser.parse_args()

    on_gpu = args.device.startswith("cuda")
    shape = args.shape or ("llama-8b" if on_gpu else "cpu-small")
    load_start = os.getloadavg()
    import torch

    if not on_gpu:  # every process (this one while profiling, each worker) computes with the same threads
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    gpus = torch.cuda.device_count() if on_gpu else 0
    devices = ({"prefill": "cuda:0", "decode": f"cuda:{1 if gpus > 1 else 0}", "colocated": "cuda:0"} if on_gpu
               else {"prefill": "cpu", "decode": "cpu", "colocated": "cpu"})
    affinity = args.cpu_affinity
    if affinity is None:
        affinity = parse_cpu_affinity("prefill=0,decode=1,router=0") if not on_gpu and len(os.sched_getaffinity(0)) > 1 else {}

    args.blocks = args.blocks or (16384 if on_gpu else 2048)
    args.num_requests = args.num_requests or (600 if on_gpu else 150)
    args.quiet_load = args.quiet_load if args.quiet_load is not None or on_gpu else 0.8
    model_dir = write_model(shape, args.cache_dir)
    max_context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    inputs, outputs = workload(max_context)
    args.budget = args.budget or 4 * round(inputs.mean)
    spec = WorkloadSpec(rate=1.0, dataset=None, input_lengths=inputs, output_lengths=outputs)
    started = time.perf_counter()
    prof = profile(model_dir, "cuda:0" if on_gpu else "cpu", args.blocks, args.budget, inputs, outputs,
                   args.tpot_factor, max_decode_batch=min(256, args.blocks * 16 // (inputs.max + outputs.max)))
    gpu = gpu_for_capacity(prof, args.blocks * 16)
    engine = model_for(prof, gpu, None)
    prefill_one = engine.prefill_time(1, 1, [round(inputs.mean)])
    decode_one = engine.decode_time(1, 1, 1, round(inputs.mean + outputs.mean / 2))
    slo = (args.ttft_factor * prefill_one, args.tpot_factor * decode_one)
    # The loaded probe runs below the knee the bare engine predicts: busy, but not a queue that only grows.
    load_rate = (LOAD_FACTOR * predicted_goodput("colocated", engine, spec, slo, args.budget, 1e3, n=args.num_requests)
                 if "colocated" in args.modes else None)
    prof = profile_served_path(prof, model_dir, args.modes, worker_args_of(args), devices, affinity, inputs, outputs,
                               load_rate, max(20, args.num_requests // 2))
    latency = {m: model_for(prof, gpu, m) for m in args.modes}
    link_gbps = kv_link(prof)
    # Bisected on traces as long as the replayed ones: a short trace builds less queue, so a 600-request
    # goodput would put every replayed rate below the knee of the traces actually sent.
    goodput = {m: predicted_goodput(m, latency[m], spec, slo, args.budget, link_gbps, n=args.num_requests)
               for m in args.modes}
    rates = {m: args.rates or bracket(goodput[m], args.rate_factors) for m in args.modes}
    print(f"{shape} on {args.device}: prefill({round(inputs.mean)}) {prefill_one * 1e3:.2f} ms, decode step "
          f"{decode_one * 1e3:.2f} ms; SLO TTFT {slo[0] * 1e3:.1f} ms TPOT {slo[1] * 1e3:.2f} ms; KV link "
          f"{link_gbps:.2f} GB/s; predicted goodput {', '.join(f'{m} {g:.2f}' for m, g in goodput.items())} req/s; "
          f"rates {rates}", flush=True)

    modes = {m: run_mode(m, args, model_dir, prof, latency[m], engine, spec, slo, rates[m], devices, link_gbps,
                         affinity) for m in args.modes}
    fits = {"prefill": vars(engine.prefill_fits[(1, 1)]), "decode": vars(engine.decode_fits[(1, 1)])}
    doc = {
        "benchmark": "predicted_vs_measured", "goal": "simulated attainment within 2 points of measured",
        "summary": summary_of(modes, goodput),
        "device": prof.device, "shape": shape, "model": prof.model.model_dump(by_alias=True),
        "gpus_visible": gpus, "shared_gpu": on_gpu and gpus < 2 and "disaggregated" in args.modes,
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads_per_process": None if on_gpu else args.threads, "load_avg_start": load_start,
                    "cpu_affinity": {k: sorted(v) for k, v in affinity.items()}},
        "workload": {"input": inputs.model_dump(), "output": outputs.model_dump(), "requests_per_rate":
                     args.num_requests, "seed": args.seed, "source": "chatbot means scaled to the context, +-8%"},
        "slo": {"ttft_s": slo[0], "tpot_s": slo[1], "ttft_factor": args.ttft_factor, "tpot_factor": args.tpot_factor},
        "prefill_token_budget": args.budget, "kv_blocks": args.blocks, "fits": fits, "kv_link_gbps": link_gbps,
        "predicted_goodput_rps": goodput, "devices": devices, "profile": prof.model_dump(mode="json", by_alias=True),
        "modes": modes, "wall_s": time.perf_counter() - started,
    }
    print_table(doc)
    out = args.out or RESULTS / f"predicted_vs_measured-{'cuda' if on_gpu else 'cpu'}-{shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
