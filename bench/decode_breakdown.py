"""Where a decode step's GPU time goes, kernel by kernel (torch profiler on the eager fused path).

Loads a Llama checkpoint (default: the one bench/engine_gpu.py writes), runs decode steps at context
512 for a few batch sizes with CUDA graphs off (so CUPTI sees every kernel), and prints per step the
CUDA time of each kernel family next to the bytes it must move. The graph-replayed step (engine_gpu.py)
minus the sum here is the launch gaps a graph still has. Writes JSON to --out.

    PYTHONPATH=planner:runtime:cli python bench/decode_breakdown.py --checkpoint /tmp/llama-3-8b-random
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceilings import gpu_tag  # noqa: E402


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("decode_split", "attention"), ("decode_merge", "attention-merge"), ("rms", "rmsnorm"),
                     ("rope", "rope+store"), ("silu", "swiglu"), ("gemv", "gemm"), ("gemm", "gemm"),
                     ("nvjet", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("argmax", "sampling"),
                     ("reduce", "sampling"), ("embedding", "embedding"), ("index", "embedding"),
                     ("copy", "copy"), ("elementwise", "elementwise")):
        if key in n:
            return fam
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/llama-3-8b-random"))
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32, 128])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
    from torch.profiler import ProfilerActivity, profile

    engine = Engine.load(args.checkpoint, device="cuda", dtype=torch.bfloat16, cuda_graphs=False)
    vocab = engine.config.vocab_size
    result: dict = {"device": torch.cuda.get_device_name(), "context": args.context, "batches": {}}
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        reqs = [GenerationRequest(f"b{batch}-{i}", torch.randint(3, vocab, (args.context - 1,), generator=gen).tolist(),
                                  SamplingParams(max_tokens=args.steps + 8, ignore_eos=True)) for i in range(batch)]
        for i in range(0, batch, 16):
            engine.prefill(reqs[i:i + 16])
        for _ in range(3):
            engine.decode()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.decode()
            torch.cuda.synchronize()
        per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t <= 0 or ev.key.startswith("cuda"):
                continue
            per_kernel[ev.key][0] += t / args.steps / 1e3
            per_kernel[ev.key][1] += ev.count / args.steps
        families: dict[str, float] = defaultdict(float)
        for name, (ms, _) in per_kernel.items():
            families[family(name)] += ms
        total = sum(families.values())
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:20]
        result["batches"][str(batch)] = {"gpu_ms_per_step": total, "families_ms": dict(families),
                                         "top_kernels": [{"name": n[:120], "ms": v[0], "calls": v[1]} for n, v in top]}
        print(f"\nbatch {batch}: {total:.3f} ms of kernels per step", flush=True)
        for fam, ms in sorted(families.items(), key=lambda kv: -kv[1]):
            print(f"  {fam:>16} {ms:8.3f} ms")
        for n, (ms, calls) in top[:12]:
            print(f"    {ms:8.3f} ms {calls:6.0f} calls  {n[:100]}")
        for r in reqs:
            engine.abort(r.request_id)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_breakdown-{gpu_tag(result['device'])}.json").write_text(
        json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
