"""Measure an engine's prefill and decode step times over a grid; write the planner's latency profile.

Prefill is timed on batches of random prompts (prompt blocks only, released after each run).
Mixed steps (chunked prefill) are timed with `batch` decoding sequences plus one prompt prefilled in two
chunks (at offset 0 and at offset chunk), so the fit sees chunk attention over an earlier chunk's KV.
Decode is timed with `batch` sequences whose prompt KV is imported as zeros: the step reads and
computes exactly what it would with real KV, and no long prefill is spent building it. Every
shape is run once untimed first (allocator, kernels, CUDA graphs warm up). Prefill points are timed in
passes over the whole prefill grid, not one point after another, so a slow stretch of the host or the
GPU moves one sample of each point's median rather than every sample of a few points. Grid points that
cannot fit the model context or the KV cache are skipped and reported in `ProfileRun.skipped`.

Before the grid, a GPU is brought out of idle: `warmup_tokens` prompt tokens are prefilled untimed at the
grid's largest prompt. An H200 that had sat idle at 345 MHz ran the first second of prefills 1.3-1.5x
slow (a 351-token prompt in 28.8 ms, 17.8 ms once warm); those samples, the first of the grid, bent the
prefill fit about 30% slow at the workload's prompts. The warm-up is a token count, not a time, so every
tensor-parallel rank runs the same steps.

With tensor parallelism every rank must call `profile_engine` with the same arguments: prompts
come from a seeded generator, so all ranks run the same steps.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from disagg_planner.api import DecodeSample, LatencyProfile, MixedSample, PrefillSample, ShapeProfile
from disagg_planner.latency.mixed import chunk_attention

from .engine import Engine, GenerationRequest, SamplingParams
from .engine.chunked import PrefillChunk
from .engine.kv_cache import blocks_for
from .kv.payload import KVHeader, KVPayload

GRIDS: dict[str, dict[str, list[int]]] = {
    "small": {"prefill_lengths": [16, 64, 256], "prefill_batches": [1, 4], "decode_batches": [1, 4, 16],
              "contexts": [16, 128, 256], "mixed_batches": [0, 4, 16], "mixed_chunks": [16, 64]},
    "full": {"prefill_lengths": [128, 256, 512, 1024, 2048, 4096], "prefill_batches": [1, 2, 4, 8],
             "decode_batches": [1, 8, 32, 64, 128, 256], "contexts": [128, 512, 1024, 2048, 4096],
             "mixed_batches": [0, 16, 64, 128], "mixed_chunks": [256, 512, 1024, 2048]},
}

# torch.cuda.get_device_name() substrings -> the GPU type names the planner knows (ClusterSpec.gpu_type).
_GPU_TYPES = (("H200", "H200-141GB"), ("H100", "H100-80GB"), ("A100", "A100-80GB"))


@dataclass
class ProfileRun:
    """A profile plus what could not be measured."""

    profile: LatencyProfile
    skipped: list[str] = field(default_factory=list)


def gpu_type_name(device: torch.device) -> str:
    """The planner's GPU type for `device` ("CPU" on CPU; the driver's name for unknown GPUs)."""
    if device.type != "cuda":
        return "CPU"
    name = torch.cuda.get_device_name(device)
    return next((ours for key, ours in _GPU_TYPES if key in name), name)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def profile_engine(engine: Engine, *, prefill_lengths: Sequence[int], prefill_batches: Sequence[int],
                   decode_batches: Sequence[int], contexts: Sequence[int], repeats: int = 3,
                   gpu: str | None = None, log: Callable[[str], None] | None = None,
                   mixed_batches: Sequence[int] = (), mixed_chunks: Sequence[int] = (),
                   warmup_tokens: int | None = None) -> LatencyProfile:
    """Time prefill over lengths x batches, decode over batches x contexts and (when given) mixed steps over
    decode batches x chunk sizes; return the profile."""
    return run_profile(engine, prefill_lengths=prefill_lengths, prefill_batches=prefill_batches,
                       decode_batches=decode_batches, contexts=contexts, repeats=repeats, gpu=gpu, log=log,
                       mixed_batches=mixed_batches, mixed_chunks=mixed_chunks, warmup_tokens=warmup_tokens).profile


def run_profile(engine: Engine, *, prefill_lengths: Sequence[int], prefill_batches: Sequence[int],
                decode_batches: Sequence[int], contexts: Sequence[int], repeats: int = 3,
                gpu: str | None = None, log: Callable[[str], None] | None = None,
                mixed_batches: Sequence[int] = (), mixed_chunks: Sequence[int] = (),
                warmup_tokens: int | None = None) -> ProfileRun:
    """`profile_engine`, also saying which grid points were skipped. `warmup_tokens` (default
    `GPU_WARMUP_TOKENS` on a GPU, none on a CPU) are prefilled untimed before the grid."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if engine.num_running or engine.request_ids:
        raise RuntimeError("profile an idle engine: it holds requests, which would be timed along")
    say = log or (lambda _msg: None)
    if warmup_tokens is None:
        warmup_tokens = GPU_WARMUP_TOKENS if engine.device.type == "cuda" else 0
    _warm_up(engine, prefill_lengths, prefill_batches, warmup_tokens, say)
    skipped: list[str] = []
    points = []
    for length in prefill_lengths:
        for batch in prefill_batches:
            why = _prefill_unfit(engine, length, batch)
            if why:
                skipped.append(f"prefill {batch}x{length}: {why}")
            else:
                points.append((length, batch))
    prefill: list[PrefillSample] = []
    for (length, batch), seconds in zip(points, _time_prefills(engine, points, repeats), strict=True):
        prefill.append(PrefillSample(batch_size=batch, sum_tokens=batch * length,
                                     sum_sq_tokens=batch * length * length, seconds=seconds))
        say(f"prefill batch {batch:>3} x {length:>5} tokens: {seconds * 1e3:9.2f} ms")
    decode: list[DecodeSample] = []
    for context in contexts:
        for batch in decode_batches:
            why = _decode_unfit(engine, context, batch, repeats)
            if why:
                skipped.append(f"decode {batch}x{context}: {why}")
                continue
            samples = _time_decode(engine, context, batch, repeats)
            decode.extend(samples)
            say(f"decode batch {batch:>4} at context {context:>5}: "
                f"{statistics.median(s.seconds for s in samples) * 1e3:9.2f} ms")
    mixed: list[MixedSample] = []
    mixed_context = sorted(contexts)[len(contexts) // 2] if contexts else 0
    for chunk in mixed_chunks:
        for batch in mixed_batches:
            why = _mixed_unfit(engine, mixed_context, batch, chunk, repeats)
            if why:
                skipped.append(f"mixed {batch}+{chunk}: {why}")
                continue
            samples = _time_mixed(engine, mixed_context, batch, chunk, repeats)
            mixed.extend(samples)
            say(f"mixed step, {batch:>4} decodes + {chunk:>5}-token chunk: "
                f"{statistics.median(s.seconds for s in samples) * 1e3:9.2f} ms")
    if not prefill or not decode:
        raise RuntimeError(f"nothing measurable for {'prefill' if not prefill else 'decode'}: {skipped}")
    cfg = engine.config
    profile = LatencyProfile(
        model=cfg.to_model_spec(engine.model_id, engine.dtype_name),
        gpu=gpu or gpu_type_name(engine.device), device=device_description(engine.device),
        runtime=f"disagg engine ({engine.backend.name} attention)",
        shapes=[ShapeProfile(tp=engine.tp_size, pp=1, prefill=prefill, decode=decode, mixed=mixed,
                             overlapped_decode=engine.overlap_decode and engine.step_runner is None,
                             decode_step_batches=decode_step_batches(engine))],
    )
    return ProfileRun(profile=profile, skipped=skipped)


def decode_step_batches(engine: Engine) -> list[int]:
    """The batch sizes `engine` replays decode steps at (its CUDA graphs); empty where a step runs as is."""
    runner = engine.gpu_runner
    return list(runner.sizes) if runner is not None and engine.step_runner is None else []


def _prefill_unfit(engine: Engine, length: int, batch: int) -> str | None:
    if length + 1 > engine.max_context:
        return f"longer than the model context ({engine.max_context})"
    need = batch * blocks_for(length, engine.block_size)
    if need > engine.total_blocks:
        return f"needs {need} KV blocks, the cache has {engine.total_blocks}"
    return None


def _decode_unfit(engine: Engine, context: int, batch: int, repeats: int) -> str | None:
    steps = repeats + 1
    if context + steps + 1 > engine.max_context:
        return f"context + steps exceeds the model context ({engine.max_context})"
    need = batch * blocks_for(engine.kv_tokens(context, steps + 1), engine.block_size)
    if need > engine.total_blocks:
        return f"needs {need} KV blocks, the cache has {engine.total_blocks}"
    return None


def _mixed_unfit(engine: Engine, context: int, batch: int, chunk: int, repeats: int) -> str | None:
    steps = 2 * (repeats + 1)
    if 2 * chunk + 1 > engine.max_context or context + steps + 1 > engine.max_context:
        return f"longer than the model context ({engine.max_context})"
    need = batch * blocks_for(engine.kv_tokens(context, steps + 1), engine.block_size) + blocks_for(
        2 * chunk, engine.block_size)
    if need > engine.total_blocks:
        return f"needs {need} KV blocks, the cache has {engine.total_blocks}"
    return None


GPU_WARMUP_TOKENS = 131072  # about 3 s of Llama-3-8B prefill on an H200: past its clocks' ramp from idle
WARMUP_STEP_TOKENS = 8192


def _warm_up(engine: Engine, lengths: Sequence[int], batches: Sequence[int], tokens: int,
             say: Callable[[str], None]) -> None:
    """Prefill `tokens` prompt tokens untimed, in steps of the grid's largest prompt that fits."""
    if tokens <= 0:
        return
    fitting = [(length, batch) for length in lengths for batch in batches
               if batch * length <= WARMUP_STEP_TOKENS and _prefill_unfit(engine, length, batch) is None]
    if not fitting:
        return
    length, batch = max(fitting, key=lambda lb: (lb[0] * lb[1], lb[0]))
    steps = max(3, -(-tokens // (length * batch)))
    start = time.perf_counter()
    for step in range(steps):
        _prefill_once(engine, length, batch, run=step)
    say(f"warm-up: {steps} x {batch} x {length}-token prefills in {time.perf_counter() - start:.2f} s")


def _prompts(engine: Engine, length: int, batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.config.vocab_size, (batch, length), generator=gen).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_prefills(engine: Engine, points: Sequence[tuple[int, int]], repeats: int) -> list[float]:
    """Median seconds of each (length, batch) prefill, timed in `repeats` passes over all the points after
    one untimed pass: a stretch of slow steps (clocks, a busy host) then costs each point one sample of
    its median, instead of every sample of the points timed during it."""
    times: list[list[float]] = [[] for _ in points]
    for run in range(repeats + 1):  # run 0 warms up every shape
        for i, (length, batch) in enumerate(points):
            seconds = _prefill_once(engine, length, batch, run)
            if run:
                times[i].append(seconds)
    return [statistics.median(t) for t in times]


def _prefill_once(engine: Engine, length: int, batch: int, run: int) -> float:
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    reqs = [GenerationRequest(f"profile-p{length}x{batch}-{run}-{i}", ids, params)
            for i, ids in enumerate(_prompts(engine, length, batch, seed=length * 1000 + batch))]
    _sync(engine.device)
    start = time.perf_counter()
    engine.prefill(reqs, reserve_decode=False)
    _sync(engine.device)
    seconds = time.perf_counter() - start
    for r in reqs:
        engine.release(r.request_id)
    return seconds


def _zero_kv(engine: Engine, context: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (context, engine.num_kv_heads, engine.head_dim)
    keys = [torch.zeros(shape, dtype=engine.dtype, device=engine.device) for _ in range(engine.num_layers)]
    values = [torch.zeros(shape, dtype=engine.dtype, device=engine.device) for _ in range(engine.num_layers)]
    return keys, values


def _time_mixed(engine: Engine, context: int, batch: int, chunk: int, repeats: int) -> list[MixedSample]:
    steps = 2 * (repeats + 1)
    ids = _import_decoders(engine, context, batch, steps, "m")
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    samples = []
    try:
        for run in range(repeats + 1):  # run 0 warms up
            rid = f"profile-m{chunk}x{batch}-{run}"
            [prompt] = _prompts(engine, 2 * chunk, 1, seed=chunk * 1000 + batch)
            engine.admit_chunked(GenerationRequest(rid, prompt, params))
            for k in range(2):
                sum_context = sum(engine._seqs[i].num_cached for i in ids)
                _sync(engine.device)
                start = time.perf_counter()
                engine.mixed_step([PrefillChunk(rid, chunk)])
                _sync(engine.device)
                seconds = time.perf_counter() - start
                if run > 0:
                    samples.append(MixedSample(decode_batch=batch, decode_context=sum_context, chunks=1,
                                               chunk_tokens=chunk, chunk_attention=chunk_attention(k * chunk, chunk),
                                               seconds=seconds))
            engine.abort(rid)  # done at its first token: already released
    finally:
        for rid in ids:
            engine.abort(rid)
    return samples


def _import_decoders(engine: Engine, context: int, batch: int, steps: int, tag: str) -> list[str]:
    """`batch` sequences holding `context` tokens of zero KV, each able to decode `steps` more tokens."""
    params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    keys, values = _zero_kv(engine, context)
    ids = []
    for i, prompt in enumerate(_prompts(engine, context, batch, seed=context * 1000 + batch)):
        rid = f"profile-{tag}{context}x{batch}-{i}"
        header = KVHeader(request_id=rid, model_id=engine.model_id, num_layers=engine.num_layers,
                          num_kv_heads=engine.num_kv_heads, head_dim=engine.head_dim, dtype=engine.dtype_name,
                          num_tokens=context)
        # first_token must not end the request at once; prompt[0] is any in-vocab id and EOS is ignored.
        engine.import_kv(GenerationRequest(rid, prompt, params), KVPayload(header, keys, values), prompt[0])
        ids.append(rid)
    return ids


def _time_decode(engine: Engine, context: int, batch: int, repeats: int) -> list[DecodeSample]:
    """Decode step times as a worker sees them: one whole step per call, or, on an engine that overlaps
    decode steps (engine/overlap.py), back-to-back calls in steady state, each one launching a step and
    completing the one before; its wall time is then the step's, the host work hidden behind the GPU."""
    steps = repeats + 1
    overlapped = engine.overlap_decode and engine.step_runner is None
    ids = _import_decoders(engine, context, batch, steps + 1, "d")
    samples = []
    try:
        if overlapped:
            _sync(engine.device)
            engine.decode()  # launches the first step; each call below completes one
        for step in range(steps):
            if not overlapped:
                _sync(engine.device)
            start = time.perf_counter()
            outs = engine.decode(overlapped=overlapped)
            if not overlapped:
                _sync(engine.device)
            seconds = time.perf_counter() - start
            if len(outs) != batch:
                raise RuntimeError(f"decode stepped {len(outs)} sequences, expected {batch}")
            if step > 0:  # step 0 warms up
                samples.append(DecodeSample(batch_size=batch, sum_context=batch * (context + step),
                                            seconds=seconds))
    finally:
        for rid in ids:
            engine.abort(rid)
        engine.settle()  # a step still in flight completes; its blocks go back
        engine.take_completed()
    return samples
