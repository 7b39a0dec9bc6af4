"""Tensor parallelism: tp=2 over gloo (two spawned processes, DeepSpeed AutoTP) gives the tokens of tp=1."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models import build_model, parse_config
from disagg_runtime.models.testing import tiny_config
from disagg_runtime.parallel import TensorParallelError, check_shardable

pytest.importorskip("deepspeed")


def _requests() -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(4, 512, (n,), generator=gen).tolist() for n in (5, 19, 40)]
    reqs = [GenerationRequest(f"g{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(prompts)]
    reqs.append(GenerationRequest("seeded", prompts[1], SamplingParams(max_tokens=16, temperature=0.8, seed=7)))
    reqs.append(GenerationRequest("unseeded", prompts[2], SamplingParams(max_tokens=16, temperature=1.0)))
    return reqs


def _worker(rank: int, world: int, port: int, model_dirs: dict, results) -> None:
    # One thread per rank: two ranks on two cores, and DeepSpeed's CPU all-reduce spins while it waits.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for name, model_dir in model_dirs.items():
            engine = Engine.load(model_dir, num_blocks=64, tp_group=dist.group.WORLD)
            out[name] = {"tokens": engine.generate(_requests()), "kv_heads": engine.num_kv_heads,
                         "kv": engine.export_kv(engine.prefill(_requests()[:1])[0].request_id).header.num_kv_heads}
        results.put((rank, out))
    except Exception as exc:  # report instead of leaving the parent waiting
        results.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~8 s; ~40 s the first time, when DeepSpeed JIT-builds its CPU all-reduce op
def test_tp2_over_gloo_generates_the_tokens_of_tp1(model_dirs):
    dirs = {name: str(model_dirs[name]) for name in ("llama", "opt")}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, dirs, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=150) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(isinstance(v, dict) for v in got.values()), got
    for name, model_dir in dirs.items():
        want = Engine.load(model_dir, num_blocks=64).generate(_requests())
        want.pop("unseeded")
        kv_heads = parse_config(tiny_config("opt" if name == "opt" else "llama")).num_kv_heads // 2
        shards = [got[rank][name] for rank in (0, 1)]
        # Unseeded sampling is random, but both ranks draw the same (they share the fallback seed).
        assert shards[0]["tokens"].pop("unseeded") == shards[1]["tokens"].pop("unseeded")
        for rank, shard in enumerate(shards):
            assert shard["kv_heads"] == shard["kv"] == kv_heads
            assert shard["tokens"] == want, (name, rank)


def test_shapes_that_do_not_split_are_refused():
    model = build_model(parse_config(tiny_config("llama", num_key_value_heads=1)))
    with pytest.raises(TensorParallelError, match=r"KV heads \(1\) do not divide by tp=2"):
        check_shardable(model, 2)
    check_shardable(build_model(parse_config(tiny_config("llama"))), 2)
