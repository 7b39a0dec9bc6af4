"""Kernel variants timed the way a step runs them: decode attention and the decode projections over 32 layers
in one CUDA graph, prefill attention per call, each against its floor.

Decode (Llama-3-8B layer shape: 32 query heads, 8 KV heads, head dim 128, blocks of 16 tokens): every layer
has its own cache, each sequence's blocks are consecutive as the engine's allocator hands them out, and the
32 calls of one step are captured in one graph, so a variant's time includes the launch gaps of its
kernels (the merge kernel too) as a step pays them. Variants: tile, warps, pipelining depth, context
splits, and the cache stored head-major ([blocks, heads, 16, D], read through a permuted view). Judged by the
K/V bytes read over the measured copy bandwidth. Isolated like this a variant can win and still not speed up
the whole step (bench/NOTES-gpu.md, section 6): confirm with bench/engine_gpu.py.

Projections: each decode GEMM at batch 1-128 over 32 weights in one graph, `F.linear` on the checkpoint's
[out, in] weight against `x @ w_t` on an [in, out] copy, judged by the weight bytes.

Prefill (one prompt of 1-4k tokens): the Triton flash kernel's tile shapes against FlashAttention-2, judged
by the causal FLOPs over the measured matmul rate.

    PYTHONPATH=planner:runtime:cli python bench/kernel_variants.py --out bench/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceilings import gpu_tag, measure_copy_bandwidth, measure_matmul_rate, time_cuda  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK, LAYERS = 32, 8, 128, 16, 32


def decode_variants(batch: int) -> list[dict]:
    from disagg_runtime.kernels.triton_paged_decode import default_num_splits

    default = default_num_splits(batch, KV_HEADS, torch.device("cuda"))
    out = [{"block_n": 64, "num_warps": 4, "num_stages": None, "splits": default, "layout": "nhd", "name": "current"}]
    splits = sorted({1, 4, default} if batch <= 16 else {1, default})
    tiles = [(32, 4), (64, 4), (128, 4), (128, 8)]
    for (bn, w), st, s in itertools.product(tiles, (2, 4), splits):
        out.append({"block_n": bn, "num_warps": w, "num_stages": st, "splits": s, "layout": "nhd"})
    for bn, st, s in itertools.product((32, 64), (2, 4), splits):
        out.append({"block_n": bn, "num_warps": 4, "num_stages": st, "splits": s, "layout": "hnd"})
    return out


def time_decode(batch: int, context: int, bw: float) -> dict:
    from disagg_runtime.kernels.reference import paged_decode_attention_ref
    from disagg_runtime.kernels.triton_paged_decode import paged_decode_attention_triton

    dev = torch.device("cuda")
    per_seq = -(-context // BLOCK)
    blocks = batch * per_seq + 8
    gen = torch.Generator(device=dev).manual_seed(batch)
    caches = {}
    for layout in ("nhd", "hnd"):
        layers = []
        for _ in range(LAYERS):
            shape = (blocks, BLOCK, KV_HEADS, DIM) if layout == "nhd" else (blocks, KV_HEADS, BLOCK, DIM)
            k = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen)
            if layout == "hnd":
                k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            layers.append((k, v))
        caches[layout] = layers
    tables = torch.arange(batch * per_seq, device=dev, dtype=torch.int32).view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.long, device=dev)
    qs = [torch.randn(batch, HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(LAYERS)]
    scale = DIM ** -0.5
    k0, v0 = caches["nhd"][0]
    ref = paged_decode_attention_ref(qs[0].float(), k0.float(), v0.float(), tables, lens, scale)
    nbytes = LAYERS * 2 * batch * context * KV_HEADS * DIM * 2
    rows = []
    for var in decode_variants(batch):
        kw = {k: var[k] for k in ("block_n", "num_warps", "num_stages")}
        layers = caches[var["layout"]]

        def step(kw=kw, layers=layers, s=var["splits"]):
            return [paged_decode_attention_triton(q, k, v, tables, lens, scale, s, **kw)
                    for q, (k, v) in zip(qs, layers, strict=True)]

        try:
            first = step()[0]
            err = ((first.float() - ref).norm() / ref.norm()).item() if var["layout"] == "nhd" else \
                ((first.float() - paged_decode_attention_ref(qs[0].float(), layers[0][0].float(),
                                                             layers[0][1].float(), tables, lens, scale)).norm()
                 / ref.norm()).item()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            t = statistics.median(time_cuda(graph.replay, warmup=3, repeats=20))
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile or capture is skipped
            print(f"  skip {var}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({**var, "step_us": t * 1e6, "per_layer_us": t * 1e6 / LAYERS, "fraction": nbytes / bw / t,
                     "rel_err": err})
        del graph
    current = rows[0]
    best = min(rows, key=lambda r: r["step_us"])
    print(f"decode batch {batch:4} ctx {context}: current {current['per_layer_us']:6.1f} us/layer "
          f"({current['fraction']:.0%})  best {best['per_layer_us']:6.1f} ({best['fraction']:.0%}) "
          f"{ {k: best[k] for k in ('block_n', 'num_warps', 'num_stages', 'splits', 'layout')} }", flush=True)
    for layout in ("nhd", "hnd"):
        sub = [r for r in rows if r["layout"] == layout]
        if sub:
            b = min(sub, key=lambda r: r["step_us"])
            print(f"    best {layout}: {b['per_layer_us']:6.1f} us ({b['fraction']:.0%}) "
                  f"bn={b['block_n']} w={b['num_warps']} st={b['num_stages']} s={b['splits']}", flush=True)
    del caches
    torch.cuda.empty_cache()
    return {"batch": batch, "context": context, "bytes": nbytes, "current": current, "best": best,
            "top10": sorted(rows, key=lambda r: r["step_us"])[:10], "all": rows}


GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def time_gemms(rows: int, bw: float) -> dict:
    """Each decode projection at `rows` tokens, 32 different weights in one graph: `F.linear` on the
    checkpoint's [out, in] weight against `x @ w_t` on a [in, out] copy (cuBLAS picks other kernels)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(rows)
    out: dict = {}
    for name, (n, k) in GEMM_SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / 64 for _ in range(LAYERS)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=gen)
        nbytes = LAYERS * n * k * 2
        res = {}
        def linear(x=x, ws=ws):
            return [torch.nn.functional.linear(x, w) for w in ws]

        def mm_t(x=x, wts=wts):
            return [x @ w for w in wts]

        for variant, fn in (("linear", linear), ("mm_t", mm_t)):
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            t = statistics.median(time_cuda(graph.replay, warmup=3, repeats=20))
            res[variant] = {"per_call_us": t * 1e6 / LAYERS, "fraction": nbytes / bw / t}
            del graph
        out[name] = res
    torch.cuda.empty_cache()
    print(f"gemm rows {rows:4}: " + "  ".join(
        f"{name} {r['linear']['per_call_us']:6.1f}/{r['mm_t']['per_call_us']:6.1f} us "
        f"({r['linear']['fraction']:.0%}/{r['mm_t']['fraction']:.0%})" for name, r in out.items()), flush=True)
    return out


PREFILL_CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
                   (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3),
                   (128, 64, 4, 3), (64, 32, 4, 3)]


def time_prefill(tokens: int, mm: float) -> dict:
    from disagg_runtime.kernels.ops import flash_varlen_attention
    from disagg_runtime.kernels.triton_prefill import prefill_attention_triton

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(tokens)
    sets = [tuple(torch.randn(tokens, h, DIM, device=dev, dtype=torch.bfloat16, generator=gen)
                  for h in (HEADS, KV_HEADS, KV_HEADS)) for _ in range(3)]
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=dev)
    scale = DIM ** -0.5
    flops = 2 * 2 * HEADS * DIM * tokens * (tokens + 1) / 2
    ref = flash_varlen_attention(*sets[0], cu, tokens, scale)
    turn = itertools.cycle(range(len(sets)))
    t_fa2 = statistics.median(time_cuda(lambda: flash_varlen_attention(*sets[next(turn)], cu, tokens, scale),
                                        warmup=3, repeats=20))
    rows = [{"name": "fa2", "us": t_fa2 * 1e6, "fraction": flops / mm / t_fa2}]
    for bm, bn, w, st in PREFILL_CONFIGS:
        def call(bm=bm, bn=bn, w=w, st=st):
            return prefill_attention_triton(*sets[next(turn)], cu, tokens, scale, block_m=bm, block_n=bn,
                                            num_warps=w, num_stages=st)
        try:
            out = prefill_attention_triton(*sets[0], cu, tokens, scale, block_m=bm, block_n=bn, num_warps=w,
                                           num_stages=st)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t = statistics.median(time_cuda(call, warmup=3, repeats=20))
        except Exception as e:  # noqa: BLE001
            print(f"  skip prefill {(bm, bn, w, st)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({"name": f"triton {bm}x{bn} w{w} s{st}", "block_m": bm, "block_n": bn, "num_warps": w,
                     "num_stages": st, "us": t * 1e6, "fraction": flops / mm / t, "rel_err": err})
    best = min(rows, key=lambda r: r["us"])
    cur = next(r for r in rows if r["name"] == "triton 64x64 w4 s3")
    print(f"prefill {tokens:5} tokens: fa2 {t_fa2 * 1e6:7.1f} us, current {cur['us']:7.1f} "
          f"({cur['fraction']:.0%}), best {best['name']} {best['us']:7.1f} ({best['fraction']:.0%})", flush=True)
    return {"tokens": tokens, "flops": flops, "rows": sorted(rows, key=lambda r: r["us"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64, 128])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--parts", nargs="*", choices=("gemm", "prefill", "decode"), default=["gemm", "prefill", "decode"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    bw, mm = measure_copy_bandwidth(), measure_matmul_rate()
    res = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "matmul_flops_per_s": mm}
    if "gemm" in args.parts:
        res["gemm"] = {str(b): time_gemms(b, bw) for b in args.batches}
    if "prefill" in args.parts:
        res["prefill"] = [time_prefill(t, mm) for t in args.prefill]
    if "decode" in args.parts:
        res["decode"] = [time_decode(b, args.context, bw) for b in args.batches]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernel_variants-{gpu_tag(res['device'])}-{'-'.join(args.parts)}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
