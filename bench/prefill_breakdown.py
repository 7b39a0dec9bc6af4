"""Where the wall time of `engine.prefill` goes: host work before the first kernel, GPU idle gaps between kernels,
the kernels by family, and host work after the last one.

Loads a Llama checkpoint (default: the one bench/engine_gpu.py writes) on CUDA, times one prompt of each
length (median of 5 wall times), then profiles one more call with CPU and CUDA activity on one clock and
splits its wall time into: head (call start to the first kernel), kernels (their summed time, which is the
GPU's busy time: one stream), gaps (GPU idle between its first and last kernel) and tail (last kernel to the
call's return). A cProfile of one call lists the host functions that cost most. Writes JSON to --out.

    PYTHONPATH=planner:runtime:cli python bench/prefill_breakdown.py --checkpoint /tmp/llama-3-8b-random
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceilings import gpu_tag  # noqa: E402


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("_prefill_kernel", "attention"), ("flash", "attention"), ("rms", "rmsnorm"),
                     ("rope", "rope+store"), ("silu", "swiglu"), ("nvjet", "gemm"), ("gemm", "gemm"),
                     ("cutlass", "gemm"), ("sm90", "gemm"), ("argmax", "sampling"), ("reduce", "reduce"),
                     ("index", "gather"), ("memcpy", "copy"), ("copy", "copy")):
        if key in n:
            return fam
    return "other"


def request(tokens: int, vocab: int, tag: str):
    from disagg_runtime.engine import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(tokens)
    return GenerationRequest(f"{tag}{tokens}", torch.randint(3, vocab, (tokens,), generator=gen).tolist(),
                             SamplingParams(max_tokens=1, ignore_eos=True))


def wall(engine, tokens: int, vocab: int, repeats: int = 5) -> list[float]:
    times = []
    for i in range(repeats + 1):
        req = request(tokens, vocab, f"w{i}-")
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.prefill([req])
        times.append(time.perf_counter() - start)
        engine.abort(req.request_id)
    return times[1:]


def split_call(engine, tokens: int, vocab: int) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    req = request(tokens, vocab, "prof-")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("prefill_call"):
            engine.prefill([req])
        torch.cuda.synchronize()
    engine.abort(req.request_id)
    events = prof.events()
    call = next(e for e in events if e.name == "prefill_call" and e.device_type == DeviceType.CPU)
    # The record_function range shows up on the device side too (a user annotation spanning the work): skip it.
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA and e.name != "prefill_call"
                      and e.time_range.end > e.time_range.start), key=lambda e: e.time_range.start)
    launches = sorted((e for e in events if e.device_type == DeviceType.CPU
                       and ("LaunchKernel" in e.name or "Memcpy" in e.name or "launch" in e.name.lower())),
                      key=lambda e: e.time_range.start)
    busy = 0.0
    families: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in kernels:
        d = e.time_range.end - e.time_range.start
        busy += d
        families[family(e.name)] += d
        counts[family(e.name)] += 1
    gaps = []
    end = kernels[0].time_range.end
    for prev, e in zip(kernels, kernels[1:], strict=False):
        end = max(end, prev.time_range.end)
        if e.time_range.start > end:
            gaps.append((e.time_range.start - end, prev.name[:60], e.name[:60], end))
    gaps.sort(reverse=True)
    c0, c1 = call.time_range.start, call.time_range.end
    k0, k1 = kernels[0].time_range.start, max(e.time_range.end for e in kernels)
    # Host work that ran before the device got its first piece of work, longest first.
    head_ops = sorted(((e.time_range.end - e.time_range.start, e.name) for e in events
                       if e.device_type == DeviceType.CPU and e.name != "prefill_call"
                       and e.time_range.start >= c0 and e.time_range.start < k0), reverse=True)[:15]
    ms = 1e-3
    return {"wall_ms": (c1 - c0) * ms, "head_ms": (k0 - c0) * ms, "kernels_ms": busy * ms,
            "gaps_ms": ((k1 - k0) - busy) * ms, "tail_ms": (c1 - k1) * ms, "kernels": len(kernels),
            "first_launch_ms": ((launches[0].time_range.start - c0) * ms) if launches else None,
            "first_kernel": kernels[0].name[:80],
            "largest_gaps": [{"ms": g * ms, "after": a, "before": b, "at_ms": (t - c0) * ms}
                             for g, a, b, t in gaps[:10]],
            "head_cpu_ops": [{"ms": d * ms, "name": n[:80]} for d, n in head_ops],
            "families_ms": {k: v * ms for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "family_counts": dict(counts)}


def host_profile(engine, tokens: int, vocab: int) -> str:
    req = request(tokens, vocab, "cprof-")
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    engine.prefill([req])
    torch.cuda.synchronize()
    pr.disable()
    engine.abort(req.request_id)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/llama-3-8b-random"))
    ap.add_argument("--tokens", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from disagg_runtime.engine import Engine

    engine = Engine.load(args.checkpoint, device="cuda", dtype=torch.bfloat16)
    vocab = engine.config.vocab_size
    wall(engine, max(args.tokens), vocab, repeats=1)
    result: dict = {"device": torch.cuda.get_device_name(), "prompts": {}}
    for t in args.tokens:
        w = wall(engine, t, vocab)
        split = split_call(engine, t, vocab)
        result["prompts"][str(t)] = {"wall_ms_median": statistics.median(w) * 1e3, "wall_ms": [x * 1e3 for x in w],
                                     "profiled_call": split}
        print(f"{t:5} tokens: wall {statistics.median(w) * 1e3:7.2f} ms | profiled {split['wall_ms']:7.2f} = head "
              f"{split['head_ms']:5.2f} + kernels {split['kernels_ms']:7.2f} ({split['kernels']}) + gaps "
              f"{split['gaps_ms']:5.2f} + tail {split['tail_ms']:5.2f}", flush=True)
        print("      " + ", ".join(f"{k} {v:.2f}" for k, v in split["families_ms"].items()), flush=True)
        print(f"      first launch at {split['first_launch_ms']} ms, first kernel {split['first_kernel']}", flush=True)
        for g in split["largest_gaps"][:5]:
            print(f"      gap {g['ms']:.3f} ms at {g['at_ms']:.2f} ms: after {g['after']} before {g['before']}", flush=True)
        for op in split["head_cpu_ops"][:8]:
            print(f"      head op {op['ms']:.3f} ms {op['name']}", flush=True)
    result["host_profile_1024"] = host_profile(engine, 1024, vocab)
    print(result["host_profile_1024"][:3000], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_breakdown-{gpu_tag(result['device'])}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
