"""One rank of a multi-rank (tp x pp) worker instance: rank 0 serves HTTP, the others follow it in lockstep."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch
from aiohttp import web

from ..parallel.groups import CollectiveError, InstanceGroups, Rendezvous, join_instance
from ..parallel.instance import InstanceEngine, follow
from ..parallel.ranks import Parallelism
from .options import ServeError
from .runner import serve_until_stopped

log = logging.getLogger(__name__)


def _rank_device(name: str) -> torch.device:
    from .roles import _device

    dev = torch.device(_device(name))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _model_dir(args: argparse.Namespace) -> Path:
    from .roles import resolve_model_dir

    return resolve_model_dir(args)


def _load(args: argparse.Namespace, groups: InstanceGroups):
    from ..parallel.rank_engine import load_rank_engine

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return load_rank_engine(_model_dir(args), groups, dtype=dtype, block_size=args.block_size,
                            num_blocks=args.num_kv_blocks, kv_memory_fraction=args.kv_memory_fraction)


def run_rank(args: argparse.Namespace) -> int:
    """Join the instance (rendezvous from the environment), load this rank's shard, serve or follow."""
    shape = Parallelism(args.tp, args.pp)
    device = _rank_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Ranks share the host's cores; one thread each keeps them from starving one another.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    try:
        # stdout carries only rank 0's "listening" line; DeepSpeed prints its banners there.
        with contextlib.redirect_stdout(sys.stderr):
            groups = join_instance(Rendezvous.from_env(timeout_s=args.collective_timeout), shape, device)
            engine = _load(args, groups)
    except CollectiveError as e:
        raise ServeError(str(e)) from e
    try:
        if groups.rank == 0:
            return asyncio.run(_lead(args, engine, groups))
        return _follow(args, engine, groups)
    finally:
        groups.close()


def _follow(args: argparse.Namespace, engine, groups: InstanceGroups) -> int:
    from ..kv.reshard import share_of
    from ..parallel.instance import full_layers
    from ..parallel.rank_kv import RankKVPuller, RankKVServer
    from ..security.tokens import InternalToken

    token = InternalToken.from_file(args.internal_token_file) if args.internal_token_file else None
    lock = threading.Lock()
    server = puller = None
    port = None
    if args.role == "prefill":
        held = share_of(groups.layout, full_layers(engine), engine.config.num_kv_heads)
        server = RankKVServer(engine, lock, held, timeout=args.kv_timeout, token=token)
        port = server.start()
    elif args.role == "decode":
        from ..workers.sharded_kv import share_target

        target = share_target(engine, groups.rank, groups.layout.shape)
        puller = RankKVPuller(target, device=engine.device, channel=args.kv_channel, codec=args.kv_compression,
                              timeout=args.kv_timeout, token=token)
    groups.gather_objects((args.advertise_host or "", port))
    try:
        return follow(engine, groups, lock, puller)
    finally:
        for part in (server, puller):
            if part is not None:
                part.close()


async def _lead(args: argparse.Namespace, engine, groups: InstanceGroups) -> int:
    from ..workers.colocated import ColocatedWorker
    from ..workers.decode import DecodeWorker
    from ..workers.prefill import PrefillWorker
    from ..workers.protocol import KVRankRef
    from .roles import worker_config

    instance = InstanceEngine(engine, groups, heartbeat_s=args.collective_timeout / 5)
    cls = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}[args.role]
    worker = cls(instance, worker_config(args))
    app = worker.app()
    failed = asyncio.Event()

    async def started(_app: web.Application) -> None:
        port = worker.kv_port
        endpoints = await asyncio.to_thread(groups.gather_objects, (args.advertise_host or "", port))
        if args.role == "prefill":
            worker.kv_ranks = [KVRankRef(host=h, port=p) for h, p in endpoints]
        instance.start_heartbeat()
        app["instance_monitor"] = asyncio.create_task(_watch(instance, worker, failed))

    async def stopped(_app: web.Application) -> None:
        await asyncio.to_thread(instance.stop)

    app.on_startup.append(started)
    app.on_cleanup.append(stopped)
    await serve_until_stopped(app, args.host or "0.0.0.0", args.port, drain=worker.start_drain,
                              drained=worker.drained,
                              extra=lambda: {"role": args.role, "kvPort": worker.kv_port, "ranks": groups.layout.shape.world})
    return 1 if failed.is_set() else 0


async def _watch(instance: InstanceEngine, worker, failed: asyncio.Event) -> None:
    """When a rank fails: end every in-flight request with the reason, fail /readyz, leave."""
    while not instance.failed.is_set():
        await asyncio.sleep(0.1)
    failed.set()
    worker.start_drain()  # new requests get 503 and /readyz fails from here on
    worker.fail_in_flight(f"{instance.failure}; this instance is out of service")
    worker.thread.stop(timeout=1.0)
    await asyncio.sleep(1.0)  # let the streams write their error lines before the server closes
