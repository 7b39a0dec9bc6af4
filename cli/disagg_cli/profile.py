"""`disagg profile MODEL_DIR --out FILE`: time the engine's prefill and decode steps, write a latency profile.

Run under `torchrun --nproc-per-node N` to profile a tensor-parallel instance (tp=N); rank 0 writes the file.
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
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from disagg_runtime.engine import Engine
    from disagg_runtime.models import ModelLoadError
    from disagg_runtime.profiler import GRIDS, run_profile
    from disagg_runtime.tokenizer import TokenizerNotFound

    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    except (ModelLoadError, TokenizerNotFound, ValueError, RuntimeError) as exc:
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
        log(f"wrote {args.out}: {len(shape.prefill)} prefill and {len(shape.decode)} decode samples "
            f"(tp={shape.tp}, {result.profile.gpu})")
    return 0
