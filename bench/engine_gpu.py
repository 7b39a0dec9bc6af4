"""Engine speed on one GPU against its floors and against HF transformers eager, in one run.

Llama-3-8B shape, random bf16 weights. Measures the copy bandwidth and the bf16 matmul rate, then
times (1) HF `LlamaForCausalLM` eager (SDPA attention, DynamicCache) and (2) the disagg engine loaded
from a checkpoint holding the very same tensors: prefill of one prompt of 512-4096 tokens, and the
decode step at context 512 for batch 1-128. Decode is judged against the HBM floor (weights + KV
bytes over the copy bandwidth), prefill against the FLOP floor (FLOPs over the matmul rate); see
bench/gpu_ceilings.py and bench/NOTES-gpu.md. Finally the runtime profiler writes the latency
profile the planner fits. Prints a table; writes JSON (and the profile) into --out.

    PYTHONPATH=planner:runtime:cli python bench/engine_gpu.py --out bench/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceilings import LlamaShape, gpu_tag, measure_copy_bandwidth, measure_matmul_rate, time_cuda  # noqa: E402
from hf_baseline import (  # noqa: E402
    build_random_hf_llama,
    llama_config_dict,
    time_hf_decode,
    time_hf_prefill,
    write_checkpoint,
)

PREFILL_LENGTHS = (512, 1024, 2048, 4096)
DECODE_BATCHES = (1, 8, 32, 64, 128)
CONTEXT = 512
T0 = time.perf_counter()


def log(*parts) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *parts, flush=True)


def write_tokenizer(out_dir: Path, vocab: int) -> None:
    """A real BPE tokenizer.json (trained on a small text; its vocab is smaller than the model's, which
    only matters for detokenizing the random ids the benchmark generates)."""
    from disagg_runtime.models.testing import train_tokenizer

    train_tokenizer(vocab, ["<unk>", "<s>", "</s>"], "<s>").save(str(out_dir / "tokenizer.json"))


def time_engine_prefill(engine, tokens: int, vocab: int, repeats: int = 5) -> dict:
    """Wall seconds of `engine.prefill` on one prompt (a synchronous call: it returns the first token)."""
    from disagg_runtime.engine import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(tokens)
    times = []
    for i in range(repeats + 2):
        req = GenerationRequest(f"p{tokens}-{i}", torch.randint(3, vocab, (tokens,), generator=gen).tolist(),
                                SamplingParams(max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.prefill([req])
        times.append(time.perf_counter() - start)
        engine.abort(req.request_id)
    return {"wall_s": statistics.median(times[2:]), "samples": times[2:]}


def time_engine_decode(engine, batch: int, context: int, vocab: int, steps: int = 20, warmup: int = 3) -> dict:
    """Wall seconds of `engine.decode()` with `batch` sequences whose KV holds `context` tokens at the
    first timed step (one more at each later step), back to back as a worker calls it: overlapped (the
    engine's default on this path, each call returning the step the call before launched) and plain
    (`overlapped=False`, one whole step per call); plus the GPU time of the captured step alone."""
    from disagg_runtime.engine import GenerationRequest, SamplingParams

    def calls(overlapped: bool, tag: str) -> list[float]:
        gen = torch.Generator().manual_seed(batch)
        reqs = [GenerationRequest(f"d{tag}{batch}-{i}", torch.randint(3, vocab, (context - 1,), generator=gen).tolist(),
                                  SamplingParams(max_tokens=steps + warmup + 4, ignore_eos=True))
                for i in range(batch)]
        for i in range(0, batch, 16):  # prefill in chunks of 8k tokens: activations stay small next to the KV
            engine.prefill(reqs[i:i + 16])
        torch.cuda.synchronize()
        times, produced = [], 0
        for i in range(warmup + steps):
            start = time.perf_counter()
            outs = engine.decode(overlapped=overlapped)
            times.append(time.perf_counter() - start)
            produced += len(outs) if i >= warmup else 0
        assert produced == batch * steps, (produced, batch * steps)
        for r in reqs:
            engine.abort(r.request_id)
        engine.decode(overlapped=False)  # completes a step still in flight; nothing is left running
        return times[warmup:]

    overlapped = calls(True, "o")
    runner = getattr(engine, "gpu_runner", None)
    graph = statistics.median(time_cuda(runner.replay_last, warmup=3, repeats=20)) \
        if runner is not None and runner.can_replay else None
    plain = calls(False, "p")
    result = {"wall_s": statistics.median(overlapped), "samples": overlapped,
              "plain_wall_s": statistics.median(plain), "plain_samples": plain,
              "mean_context": context + (warmup + steps - 1) / 2}
    if graph is not None:
        result["graph_s"] = graph
    return result


def run_profile(engine, out: Path) -> str | None:
    """Write the latency profile the planner fits; returns its path (None if the profiler is missing)."""
    try:
        from disagg_runtime.profiler import profile_engine
    except ImportError as exc:
        log("profiler not available:", exc)
        return None
    profile = profile_engine(engine, prefill_lengths=[128, 256, 512, 1024, 2048, 4096], prefill_batches=[1, 2, 4],
                             decode_batches=[1, 8, 32, 64, 128], contexts=[128, 512, 1024, 2048], repeats=3)
    path = out / "profile.json"
    profile.save(path)
    return str(path)


def summarize(res: dict) -> dict:
    """The issue's figures: each decode batch's GPU step and whole call, and each prefill, against its floor."""
    shape = LlamaShape(**res["shape"]["numbers"])
    bw, mm = res["ceilings"]["copy_bytes_per_s"], res["ceilings"]["matmul_flops_per_s"]
    step, call = {}, {}
    for b, d in res["engine"]["decode"].items():
        floor = shape.decode_bytes(int(b), CONTEXT) / bw
        call[b] = floor / d["wall_s"]
        if d.get("graph_s"):
            step[b] = floor / d["graph_s"]
    prefill = {t: shape.prefill_flops(int(t)) / mm / d["wall_s"] for t, d in res["engine"]["prefill"].items()}
    return {"decode_step_floor_fraction": step, "decode_call_floor_fraction": call,
            "prefill_matmul_fraction": prefill,
            "goals": {"decode_step_floor_fraction": 0.85, "decode_call_floor_fraction": 0.80,
                      "prefill_matmul_fraction_from_1024": 0.80},
            "met": {"decode_step": bool(step) and min(step.values()) >= 0.85,
                    "decode_call": min(call.values()) >= 0.80,
                    "prefill": min(v for t, v in prefill.items() if int(t) >= 1024) >= 0.80}}


def table(res: dict) -> str:
    shape = LlamaShape(**res["shape"]["numbers"])
    bw, mm = res["ceilings"]["copy_bytes_per_s"], res["ceilings"]["matmul_flops_per_s"]
    lines = [f"device {res['device']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", "",
             "prefill (1 prompt)  floor ms |  HF eager ms  % of floor | engine ms  % of floor",
             "-" * 79]
    for t in PREFILL_LENGTHS:
        floor = shape.prefill_flops(t) / mm
        hf = res["hf"]["prefill_s"][str(t)] if res["hf"] else float("nan")
        en = res["engine"]["prefill"][str(t)]["wall_s"]
        lines.append(f"{t:>8} tokens  {floor * 1e3:9.2f} | {hf * 1e3:11.2f}  {floor / hf:9.1%} | "
                     f"{en * 1e3:9.2f}  {floor / en:9.1%}")
    lines += ["", f"decode (context {CONTEXT})  floor ms |  HF eager ms  % | engine call ms  % | plain call ms  % "
              "| GPU step ms  %", "-" * 108]
    for b in DECODE_BATCHES:
        floor = shape.decode_bytes(b, CONTEXT) / bw
        hf = res["hf"]["decode_s"][str(b)] if res["hf"] else float("nan")
        en = res["engine"]["decode"][str(b)]
        g = en.get("graph_s")
        gtxt = f"{g * 1e3:11.2f} {floor / g:5.1%}" if g else "          -      "
        plain = en.get("plain_wall_s") or en["wall_s"]
        lines.append(f"batch {b:>4}        {floor * 1e3:9.2f} | {hf * 1e3:11.2f} {floor / hf:5.1%} | "
                     f"{en['wall_s'] * 1e3:14.2f} {floor / en['wall_s']:5.1%} | {plain * 1e3:13.2f} "
                     f"{floor / plain:5.1%} | {gtxt}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/llama-3-8b-random"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline (write the checkpoint only)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    import transformers
    import triton

    shape = LlamaShape()
    res: dict = {"device": torch.cuda.get_device_name(), "host": platform.node(),
                 "versions": {"torch": torch.__version__, "triton": triton.__version__,
                              "transformers": transformers.__version__, "cuda": torch.version.cuda},
                 "shape": {"name": "Llama-3-8B (random bf16 weights)", "numbers": {
                     k: v for k, v in shape.to_dict().items() if k in LlamaShape.__dataclass_fields__}},
                 "context": CONTEXT}
    res["ceilings"] = {"copy_bytes_per_s": measure_copy_bandwidth(), "matmul_flops_per_s": measure_matmul_rate()}
    log("ceilings", res["ceilings"])
    res["floors"] = {
        "decode_bytes": {str(b): shape.decode_bytes(b, CONTEXT) for b in DECODE_BATCHES},
        "prefill_flops": {str(t): shape.prefill_flops(t) for t in PREFILL_LENGTHS},
    }

    # ---- HF transformers eager, and the checkpoint the engine will load ------------------------------
    config = llama_config_dict(shape)
    model = build_random_hf_llama(config, seed=0)
    write_checkpoint(model, args.checkpoint, config)
    write_tokenizer(args.checkpoint, shape.vocab)
    log("HF model built and checkpoint written")
    res["hf"] = None
    if not args.no_hf:
        time_hf_prefill(model, PREFILL_LENGTHS[-1])  # first calls pay cuBLAS / allocator warm-up
        time_hf_decode(model, 8, 64)
        res["hf"] = {"attention": model.config._attn_implementation,
                     "prefill_s": {str(t): time_hf_prefill(model, t) for t in PREFILL_LENGTHS}, "decode_s": {}}
        for b in DECODE_BATCHES:
            res["hf"]["decode_s"][str(b)] = time_hf_decode(model, b, CONTEXT)
            torch.cuda.empty_cache()
        log("HF", res["hf"])
    del model
    gc.collect()
    torch.cuda.empty_cache()

    # ---- the engine under test -------------------------------------------------------------------
    from disagg_runtime.engine import Engine

    start = time.perf_counter()
    engine = Engine.load(args.checkpoint, device="cuda", dtype=torch.bfloat16)
    res["engine"] = {"load_s": time.perf_counter() - start, "total_blocks": engine.total_blocks,
                     "block_size": engine.block_size, "gpu_path": type(getattr(engine, "gpu_runner", None)).__name__,
                     "prefill": {}, "decode": {}}
    log("engine loaded", res["engine"])
    time_engine_prefill(engine, PREFILL_LENGTHS[-1], shape.vocab, repeats=1)
    for t in PREFILL_LENGTHS:
        res["engine"]["prefill"][str(t)] = time_engine_prefill(engine, t, shape.vocab)
    for b in DECODE_BATCHES:
        res["engine"]["decode"][str(b)] = time_engine_decode(engine, b, CONTEXT, shape.vocab)
        log("engine decode", b, res["engine"]["decode"][str(b)]["wall_s"])
    res["summary"] = summarize(res)
    out_file = args.out / f"engine_{gpu_tag(res['device'])}.json"
    out_file.write_text(json.dumps(res, indent=1))
    print(table(res), flush=True)

    if not args.no_profile:
        start = time.perf_counter()
        res["profile"] = {"path": run_profile(engine, args.out), "seconds": time.perf_counter() - start}
        log("profile", res["profile"])
    out_file.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
