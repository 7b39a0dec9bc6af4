"""Paged decode attention: tile, warps, stages and context splits swept per batch size, against HBM bytes.

The Llama-3-8B layer shape (32 query heads, 8 KV heads, head dim 128, bf16, blocks of 16 tokens), random
block tables over a cache several times the L2. Each configuration is timed with CUDA events (median of
30) and judged by the bytes it must read (K and V of every context token) over the measured copy
bandwidth. Prints the best configuration per batch beside the default, writes JSON to --out.

    PYTHONPATH=planner:runtime:cli python bench/attention_sweep.py --out bench/results
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceilings import measure_copy_bandwidth, time_cuda  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64, 128])
    ap.add_argument("--contexts", type=int, nargs="*", default=[512])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from disagg_runtime.kernels.triton_paged_decode import default_num_splits, paged_decode_attention_triton

    bw = measure_copy_bandwidth()
    dev = torch.device("cuda")
    num_blocks = 40000  # 40k blocks x 16 tokens x 8 heads x 128 x 2 B = 1.3 GB per K and V
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = []
    for ctx, batch in itertools.product(args.contexts, args.batches):
        per_seq = -(-ctx // BLOCK)
        if batch * per_seq > num_blocks:
            continue
        tables = torch.randperm(num_blocks, device=dev)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
        lens = torch.full((batch,), ctx, dtype=torch.long, device=dev)
        q = torch.randn(batch, HEADS, DIM, device=dev, dtype=torch.bfloat16)
        nbytes = 2 * batch * ctx * KV_HEADS * DIM * 2
        default = default_num_splits(batch, KV_HEADS, dev)
        ref = paged_decode_attention_triton(q, k, v, tables, lens, DIM ** -0.5, default)
        splits = sorted({max(1, default // 2), default, min(32, default * 2), 1, 2, 4})
        results = []
        for block_n, warps, stages, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), splits):
            try:
                out = paged_decode_attention_triton(q, k, v, tables, lens, DIM ** -0.5, s, block_n=block_n,
                                                    num_warps=warps, num_stages=stages)
                err = (out.float() - ref.float()).abs().max().item()
                call = functools.partial(paged_decode_attention_triton, q, k, v, tables, lens, DIM ** -0.5, s,
                                         block_n=block_n, num_warps=warps, num_stages=stages)
                t = statistics.median(time_cuda(call, warmup=3, repeats=30))
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
                print(f"  skip bn={block_n} w={warps} st={stages} s={s}: {type(e).__name__}", flush=True)
                continue
            results.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": s,
                            "us": t * 1e6, "fraction": nbytes / bw / t, "max_err": err})
        base = next(r for r in results if (r["block_n"], r["num_warps"], r["num_stages"], r["splits"]) ==
                    (64, 4, 2, default))
        best = min(results, key=lambda r: r["us"])
        rows.append({"context": ctx, "batch": batch, "bytes": nbytes, "default": base, "best": best,
                     "top5": sorted(results, key=lambda r: r["us"])[:5]})
        print(f"ctx {ctx:5} batch {batch:4}: default {base['us']:7.1f} us ({base['fraction']:.0%})  best "
              f"{best['us']:7.1f} us ({best['fraction']:.0%}) bn={best['block_n']} w={best['num_warps']} "
              f"st={best['num_stages']} splits={best['splits']} err={best['max_err']:.1e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower()
    (args.out / f"attention_sweep-{name}.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                       "copy_bytes_per_s": bw, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
