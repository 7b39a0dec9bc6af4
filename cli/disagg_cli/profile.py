"""`disagg profile MODEL_DIR --out FILE`: time the engine's prefill and decode steps, write a latency profile.

Run under `torchrun --nproc-per-node N` to profile a tensor-parallel instance (tp=N); rank 0 writes the file.
With `--served colocated disaggregated` it then starts the real serving path (router + workers as local
processes) and writes what each mode adds to the engine's steps into the profile's `served` section
(disagg_runtime.served_profiler).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `profile` subcommand."""
    parser = subparsers.add_parser(
        "profile", help="measure prefill/decode step times of a model and write the planner's latency profile",
        description="Load MODEL_DIR (HF config.json + safetensors + tokenizer.json) into the engine, time prefill "
        "over prompt lengths x batch sizes and decode over batch sizes x contexts, and write a LatencyProfile JSON.",
    )
    parser.add_argument("model_dir", type=Path, help="HF-style model directory")
    parser.add_argument("--out", type=Path, required=True, help="latency-profile JSON to write")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--grid", choices=["small", "full"], default="small",
                        help="small: seconds on CPU; full: lengths up to 4096, batches up to 256 (GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per grid point (default 3)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, the checkpoint's half type (else bfloat16) on GPU")
    parser.add_argument("--gpu", help="GPU type name to record (default: derived from the device)")
    parser.add_argument("--num-blocks", type=int, help="KV blocks (default: sized from free memory)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    served = parser.add_argument_group("served path (--served)")
    served.add_argument("--served", nargs="+", choices=["colocated", "disaggregated"], default=[], metavar="MODE",
                        help="also measure the served path's overheads in these modes (colocated, disaggregated)")
    served.add_argument("--served-prompt-tokens", type=_positive, nargs="+", metavar="N",
                        help="probe prompt lengths; the first is the typical prompt, a second one separates the KV "
                             "hand-off's fixed cost from its per-token cost (default: 1/8 and 1/4 of the context)")
    served.add_argument("--served-output-tokens", type=_positive, default=64,
                        help="output tokens of every probe request (default 64)")
    served.add_argument("--served-singles", type=_positive, default=6,
                        help="back-to-back single requests per prompt length (default 6)")
    served.add_argument("--served-load-rate", type=_positive_float, metavar="REQ_PER_S",
                        help="colocated: also replay a Poisson load at this rate (req/s, at the probe lengths) with "
                        "the worker tracing its steps, for the prefills launched behind a decode step and the "
                        "decode steps as they run under load (a rate below the knee: busy, no growing queue)")
    served.add_argument("--served-load-requests", type=_positive, default=300, metavar="N",
                        help="requests of the loaded probe (default 300)")
    served.add_argument("--cpu-affinity", type=_cpu_affinity, metavar="NAME=CORES,...",
                        help="pin the served processes to cores, e.g. prefill=0,decode=1 (as disagg serve --local)")
    parser.set_defaults(run=run)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _cpu_affinity(text: str) -> dict[str, set[int]]:
    from disagg_runtime.serve.affinity import parse_cpu_affinity

    try:
        return parse_cpu_affinity(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from disagg_runtime.engine import Engine
    from disagg_runtime.models import ModelLoadError
    from disagg_runtime.profiler import GRIDS, run_profile
    from disagg_runtime.serve.options import ServeError
    from disagg_runtime.tokenizer import TokenizerNotFound

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.served and world > 1:
        print("disagg profile: --served measures a tp=1 deployment; run it without torchrun", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    group = None
    if world > 1:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        group = dist.group.WORLD
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" and world > 1 else args.device
    dtype = getattr(torch, args.dtype) if args.dtype else None

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    try:
        engine = Engine.load(args.model_dir, device=device, dtype=dtype, block_size=args.block_size,
                             num_blocks=args.num_blocks, tp_group=group)
        result = run_profile(engine, repeats=args.repeats, gpu=args.gpu, log=log, **GRIDS[args.grid])
        if args.served:
            plan = _served_plan(args, engine)
            del engine  # its memory goes to the served workers
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            result.profile = _profile_served(args, result.profile, plan, log, result.skipped)
    except (ModelLoadError, TokenizerNotFound, ServeError, ValueError, RuntimeError) as exc:
        print(f"disagg profile: {exc}", file=sys.stderr)
        return 2
    finally:
        if group is not None:
            dist.destroy_process_group()
    for note in result.skipped:
        log(f"skipped {note}")
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.profile.save(args.out)
        shape = result.profile.shapes[0]
        served = f", served path of {' and '.join(result.profile.served)}" if result.profile.served else ""
        log(f"wrote {args.out}: {len(shape.prefill)} prefill and {len(shape.decode)} decode samples "
            f"(tp={shape.tp}, {result.profile.gpu}){served}")
    return 0


def _served_plan(args: argparse.Namespace, engine):
    """Probe lengths and decode batches that fit the engine's context and KV cache."""
    from disagg_runtime.engine.kv_cache import blocks_for
    from disagg_runtime.profiler import GRIDS
    from disagg_runtime.served_profiler import ServedProbePlan

    out = args.served_output_tokens
    lengths = args.served_prompt_tokens or [max(1, engine.max_context // 8), max(2, engine.max_context // 4)]
    if max(lengths) + out > engine.max_context:
        raise ValueError(f"--served-prompt-tokens {max(lengths)} + --served-output-tokens {out} exceed the model "
                         f"context ({engine.max_context})")
    per_seq = blocks_for(lengths[0] + out, engine.block_size)
    batches = [b for b in GRIDS[args.grid]["decode_batches"] if b * per_seq <= engine.total_blocks]
    if not batches:
        raise ValueError(f"one probe of {lengths[0]} + {out} tokens needs {per_seq} KV blocks, the cache has "
                         f"{engine.total_blocks}; give --num-blocks or shorter --served-prompt-tokens")
    return ServedProbePlan(prompt_tokens=lengths, output_tokens=out, decode_batches=batches,
                           singles=args.served_singles, load_rate=args.served_load_rate,
                           load_requests=args.served_load_requests)


def _profile_served(args: argparse.Namespace, profile, plan, log, skipped: list[str]):
    """The profile with the served path measured on local processes with the engine's device and cache."""
    import torch
    from disagg_runtime.served_profiler import profile_served

    worker_args = ["--device", args.device, "--block-size", str(args.block_size)]
    if args.num_blocks:
        worker_args += ["--num-kv-blocks", str(args.num_blocks)]
    if args.dtype:
        worker_args += ["--dtype", args.dtype]
    role_args = {}
    if args.device == "cuda" and torch.cuda.device_count() > 1:  # as deployed: prefill and decode on their own GPUs
        role_args = {"prefill": ["--device", "cuda:0"], "decode": ["--device", "cuda:1"]}
    return profile_served(args.model_dir, profile, args.served, plan, worker_args=worker_args, role_args=role_args,
                          cpu_affinity=args.cpu_affinity, log=log, skipped=skipped)
