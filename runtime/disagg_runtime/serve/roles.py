"""One role per process: load the engine (workers) or connect to the workers (router), then serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from .options import ServeError
from .runner import serve_until_stopped

log = logging.getLogger(__name__)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ServeError(f"--device {name} but this torch build sees no CUDA device; use --device cpu")
    return name


def resolve_model_dir(args: argparse.Namespace) -> Path:
    """The model directory --model-path names (or the random model --model-spec describes)."""
    if args.model_path:
        model_dir = Path(args.model_path)
    else:
        from .model_cache import model_for_spec

        model_dir = model_for_spec(args.model_spec, args.cache_dir)
    if not (model_dir / "config.json").is_file():
        raise ServeError(f"{model_dir}: no config.json; --model-path must be an HF-style model directory")
    return model_dir


def load_engine(args: argparse.Namespace):
    """The engine for --model-path with the engine flags applied (one rank: tp = pp = 1)."""
    import torch

    from ..engine import Engine

    model_dir = resolve_model_dir(args)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return Engine.load(model_dir, device=_device(args.device), dtype=dtype, block_size=args.block_size,
                       num_blocks=args.num_kv_blocks, kv_memory_fraction=args.kv_memory_fraction,
                       kv_watermark=args.kv_watermark, preemption=args.preemption,
                       swap_space_bytes=int(args.swap_space_gib * 2**30),
                       overlap_decode={"auto": None, "on": True, "off": False}[args.overlap_decode])


def worker_config(args: argparse.Namespace):
    from ..workers.base import WorkerConfig

    return WorkerConfig(max_queue=args.max_queue, prefill_token_budget=args.prefill_token_budget,
                        max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                        # the router's messages re-encode a client body; decode's carry its token ids too
                        max_body_bytes=8 * args.max_body_bytes, body_timeout_s=args.body_timeout, kv_port=args.kv_port, kv_channel=args.kv_channel,
                        kv_compression=args.kv_compression, kv_timeout_s=args.kv_timeout,
                        advertise_host=args.advertise_host, colocated_prefill=args.colocated_prefill,
                        chunk_token_budget=args.chunk_token_budget, internal_token_file=args.internal_token_file,
                        step_trace_dir=args.step_trace)


async def _serve_worker(args: argparse.Namespace) -> None:
    from ..security.secret_file import SecretFileError
    from ..workers.colocated import ColocatedWorker
    from ..workers.decode import DecodeWorker
    from ..workers.prefill import PrefillWorker

    engine = load_engine(args)
    cls = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}[args.role]
    try:
        worker = cls(engine, worker_config(args))
    except SecretFileError as e:
        raise ServeError(str(e)) from e
    await serve_until_stopped(worker.app(), args.host or "0.0.0.0", args.port, drain=worker.start_drain,
                              drained=worker.drained, extra=lambda: {"role": args.role, "kvPort": worker.kv_port})


async def _serve_router(args: argparse.Namespace) -> None:
    from ..router.app import Router, RouterConfig
    from ..security.secret_file import SecretFileError

    if args.model_path and not Path(args.model_path).is_dir():
        raise ServeError(f"--model-path {args.model_path}: not a directory (the router reads the model's chat "
                         "template from it; leave the flag out for the role-tag template)")
    config = RouterConfig(prefill=args.prefill_endpoints, decode=args.decode_endpoints,
                          colocated=args.colocated_endpoints, endpoints_file=args.endpoints_file,
                          max_body_bytes=args.max_body_bytes, max_in_flight=args.max_in_flight,
                          heartbeat_timeout_s=args.heartbeat_timeout, served_model_name=args.served_model_name,
                          api_key_file=args.api_key_file, metrics_require_key=args.metrics_require_key,
                          internal_token_file=args.internal_token_file, model_path=args.model_path,
                          body_timeout_s=args.body_timeout, connect_timeout_s=args.connect_timeout,
                          response_timeout_s=args.response_timeout)
    try:
        router = Router(config)
    except SecretFileError as e:
        raise ServeError(str(e)) from e
    await serve_until_stopped(router.app(), args.host or "0.0.0.0", args.port, drain=router.start_drain,
                              drained=router.drained, extra=lambda: {"role": "router"})


def _run_rank(args: argparse.Namespace) -> int:
    from .ranked import run_rank

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_rank(args)
    except ServeError as e:
        log.error("rank %s: %s", os.environ.get("RANK"), e)
        return 2


def run_role(args: argparse.Namespace) -> int:
    """Serve `args.role` until SIGINT, or until drained after SIGTERM / POST /drain; the exit code.

    A worker with --tp x --pp > 1 launches its ranks (one process each) and supervises them.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.role != "router" and args.tp * args.pp > 1:
        from ..parallel.launcher import LaunchPlan, launch

        try:
            plan = LaunchPlan.from_env(args.tp * args.pp, tp=args.tp, stage=args.stage if args.pp > 1 else None)
        except ValueError as e:
            raise ServeError(str(e)) from e
        return launch(_run_rank, args, plan, grace_s=args.collective_timeout + 5)
    serve = _serve_router if args.role == "router" else _serve_worker
    asyncio.run(serve(args))
    return 0
