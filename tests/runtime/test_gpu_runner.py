"""The engine's GPU path. On CPU (float32, every kernel on its torch reference) the fused Llama runner and
the GPU attention backend must give the torch path's tokens, with requests joining mid-decode. On CUDA
the engine must pick the fused graph path, track a float32 CPU run within bf16 error, and the captured
decode graphs must give the eager step's logits for padded and unpadded batches."""

from __future__ import annotations

import pytest
import torch
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams, StepLayout
from disagg_runtime.engine.gpu import CAPTURE_SIZES, FusedLlama, GpuAttentionBackend, GpuStepRunner
from disagg_runtime.engine.preemption import preempt, resume
from disagg_runtime.models.testing import write_random_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _requests(lengths, max_tokens=8, seed=0, prefix="r"):
    gen = torch.Generator().manual_seed(seed)
    return [GenerationRequest(f"{prefix}{i}", torch.randint(3, 500, (n,), generator=gen).tolist(),
                              SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i, n in enumerate(lengths)]


def _run_with_late_joiners(engine: Engine) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    for o in engine.prefill(_requests([5, 30, 1])):
        got.setdefault(o.request_id, []).append(o.token_id)
    for step in range(10):
        if step == 3:
            for o in engine.prefill(_requests([12, 3], seed=1, prefix="late")):
                got.setdefault(o.request_id, []).append(o.token_id)
        for o in engine.decode():
            got.setdefault(o.request_id, []).append(o.token_id)
    while engine.has_decode_work:  # an overlapped engine returns its last step's tokens one call later
        for o in engine.decode():
            got.setdefault(o.request_id, []).append(o.token_id)
    return got


@pytest.mark.parametrize("arch,overrides", [("llama", {"rope_scaling": LLAMA3_ROPE}), ("qwen2", {})])
def test_fused_runner_gives_torch_path_tokens_with_requests_joining(tmp_path, arch, overrides):
    path = write_random_model(tmp_path, arch=arch, seed=7, **overrides)
    ref, fused = Engine.load(path), Engine.load(path)
    assert ref.gpu_runner is None  # CPU engines keep the torch path
    fused.gpu_runner = GpuStepRunner(FusedLlama(fused.model, fused.cache.layers, fused.max_context),
                                     block_size=fused.block_size, max_context=fused.max_context)
    want, got = _run_with_late_joiners(ref), _run_with_late_joiners(fused)
    assert got == want
    assert sorted(got) == ["late0", "late1", "r0", "r1", "r2"] and all(len(v) == 8 for v in got.values())


def test_only_models_whose_every_kernel_is_fused_are_captured_in_graphs(tmp_path):
    # A head dim of 16 sends RoPE to the torch reference, whose boolean indexing cannot be captured: such a
    # model runs eager steps rather than failing to load on a GPU.
    tiny = Engine.load(write_random_model(tmp_path / "tiny", arch="llama", seed=1))
    assert tiny.config.head_dim < 32
    assert not FusedLlama(tiny.model, tiny.cache.layers, tiny.max_context).graph_safe
    gpu_shaped = Engine.load(write_random_model(tmp_path / "gpu", arch="llama", seed=1, **GPU_SHAPE))
    assert FusedLlama(gpu_shaped.model, gpu_shaped.cache.layers, gpu_shaped.max_context).graph_safe


def test_fusing_shares_storage_with_the_named_parameters(tmp_path):
    engine = Engine.load(write_random_model(tmp_path, arch="llama", seed=1))
    before = sum(p.numel() for p in engine.model.parameters())
    fused = FusedLlama(engine.model, engine.cache.layers, engine.max_context)
    attn, mlp = engine.model.model.layers[0].self_attn, engine.model.model.layers[0].mlp
    qkv, gate_up = fused.layers[0].qkv, fused.layers[0].gate_up
    for param, whole in ((attn.q_proj.weight, qkv), (attn.v_proj.weight, qkv), (mlp.up_proj.weight, gate_up)):
        assert param.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    assert torch.equal(qkv[-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
    assert sum(p.numel() for p in engine.model.parameters()) == before


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gpu_attention_backend_gives_torch_backend_tokens(tmp_path, arch):
    path = write_random_model(tmp_path, arch=arch, seed=2)
    want = Engine.load(path).generate(_requests([5, 17, 40, 1]))
    got = Engine.load(path, attention_backend=GpuAttentionBackend()).generate(_requests([5, 17, 40, 1]))
    assert got == want


# ---------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_BLOCKS = 512  # a fixed cache: by default an engine takes 90% of the card and the next one gets nothing
GPU_SHAPE = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
             "num_key_value_heads": 1}  # head dim 128, GQA 2:1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _prefill_direct(fused: FusedLlama, prompts: list[list[int]], block_size: int):
    """Prefill `prompts` into blocks 0.. through the fused model itself; returns logits, block tables."""
    dev = fused.device
    tables, slots, positions, cu = [], [], [], [0]
    next_block = 0
    for p in prompts:
        nblocks = -(-(len(p) + 4) // block_size)
        table = list(range(next_block, next_block + nblocks))
        next_block += nblocks
        tables.append(table)
        slots += [table[i // block_size] * block_size + i % block_size for i in range(len(p))]
        positions += list(range(len(p)))
        cu.append(cu[-1] + len(p))
    ids = torch.tensor([t for p in prompts for t in p], device=dev)
    with torch.inference_mode():
        logits = fused.prefill_logits(ids, torch.tensor(positions, device=dev), torch.tensor(slots, device=dev),
                                      torch.tensor(cu, dtype=torch.int32, device=dev), max(map(len, prompts)),
                                      torch.tensor(cu[1:], device=dev) - 1)
    return logits, tables


def _decode_layout(prompts, tables, block_size) -> StepLayout:
    lens = [len(p) for p in prompts]
    return StepLayout(is_prefill=False, seq_lens=[1] * len(prompts), context_lens=[n + 1 for n in lens],
                      block_tables=tables, block_size=block_size,
                      slot_mapping=[t[n // block_size] * block_size + n % block_size for t, n in zip(tables, lens, strict=True)])


@pytest.mark.gpu
@needs_cuda
def test_cuda_engine_picks_fused_graphs_for_llama_and_the_backend_for_opt(tmp_path):
    llama = Engine.load(write_random_model(tmp_path / "llama", arch="llama", seed=3, **GPU_SHAPE), device="cuda",
                        num_blocks=GPU_BLOCKS)
    assert isinstance(llama.gpu_runner, GpuStepRunner) and tuple(llama.gpu_runner.sizes) == CAPTURE_SIZES
    got = _run_with_late_joiners(llama)
    assert sorted(got) == ["late0", "late1", "r0", "r1", "r2"] and all(len(v) == 8 for v in got.values())
    opt = Engine.load(write_random_model(tmp_path / "opt", arch="opt", seed=3), device="cuda", num_blocks=GPU_BLOCKS)
    assert opt.gpu_runner is None and isinstance(opt.backend, GpuAttentionBackend)
    assert all(len(v) == 6 for v in opt.generate(_requests([5, 17], max_tokens=6)).values())


@pytest.mark.gpu
@needs_cuda
def test_fused_bf16_on_gpu_tracks_float32_on_cpu(tmp_path):
    path = write_random_model(tmp_path, arch="llama", seed=5, rope_scaling=LLAMA3_ROPE, **GPU_SHAPE)
    gpu = Engine.load(path, device="cuda", dtype=torch.bfloat16, num_blocks=GPU_BLOCKS).gpu_runner
    cpu_engine = Engine.load(path)
    cpu = GpuStepRunner(FusedLlama(cpu_engine.model, cpu_engine.cache.layers, cpu_engine.max_context),
                        block_size=cpu_engine.block_size, max_context=cpu_engine.max_context)
    prompts = [p.prompt_ids for p in _requests([7, 90, 33], seed=5)]
    (lg, tables), (lc, _) = _prefill_direct(gpu.fused, prompts, 16), _prefill_direct(cpu.fused, prompts, 16)
    assert _rel(lg, lc) < 3e-2
    layout = _decode_layout(prompts, tables, 16)
    nxt, pos = lc.argmax(-1).tolist(), [len(p) for p in prompts]
    assert _rel(gpu.run(nxt, pos, layout, [0, 1, 2]), cpu.run(nxt, pos, layout, [0, 1, 2])) < 3e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 8, 17])
def test_graph_replay_matches_eager_decode(tmp_path, batch):
    engine = Engine.load(write_random_model(tmp_path, arch="llama", seed=4, **GPU_SHAPE), device="cuda",
                         num_blocks=GPU_BLOCKS)
    runner = engine.gpu_runner
    prompts = [p.prompt_ids for p in _requests([3 + 5 * i for i in range(batch)], seed=batch)]
    logits, tables = _prefill_direct(runner.fused, prompts, engine.block_size)
    layout = _decode_layout(prompts, tables, engine.block_size)
    tokens, positions = logits.argmax(-1).tolist(), [len(p) for p in prompts]
    graphed = runner.run(tokens, positions, layout, list(range(batch))).clone()
    assert runner.can_replay
    dev = runner.device
    width = max(map(len, tables))
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    with torch.inference_mode():
        eager = runner.fused.decode_logits(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                                           torch.tensor(layout.slot_mapping, device=dev), table_t,
                                           torch.tensor(layout.context_lens, device=dev))
    assert graphed.shape == eager.shape == (batch, engine.config.vocab_size)
    assert _rel(graphed, eager) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_preemption_on_the_fused_graph_path(tmp_path):
    # Block tables grow and change under preemption and the graphs take them as inputs: every request
    # must still finish, and a swap round trip through pinned host memory must bring the KV back bit for bit.
    path = write_random_model(tmp_path, arch="llama", seed=6, **GPU_SHAPE)
    requests = _requests([9, 14, 20, 25, 30, 12], max_tokens=40, seed=6)
    tight = Engine.load(path, device="cuda", dtype=torch.bfloat16, num_blocks=24, block_size=8)
    assert tight.gpu_runner is not None and tight.gpu_runner.sizes
    got = {r.request_id: [] for r in requests}
    for out in tight.prefill(requests):
        got[out.request_id].append(out.token_id)
    while tight.num_running:
        for out in tight.decode():
            got[out.request_id].append(out.token_id)
    assert all(len(v) == 40 for v in got.values())
    assert tight.preemption_stats.swapped_tokens > 0 and tight.swap_space.used_bytes == 0
    assert tight.free_blocks == tight.total_blocks

    tight.prefill(_requests([21], max_tokens=30, seed=7, prefix="x"))
    for _ in range(4):
        tight.decode()
    seq = tight._seqs["x0"]
    before = tight.cache.read(seq.block_table, seq.num_cached)
    preempt(tight, seq)
    assert seq.swapped is not None and seq.swapped.keys[0].is_pinned()
    resume(tight)
    after = tight.cache.read(seq.block_table, seq.num_cached)
    assert all(torch.equal(x, y) for x, y in zip(before[0] + before[1], after[0] + after[1], strict=True))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lengths,context", [([5], 512), ([32], 512), ([7, 90, 33], 512), ([200, 180, 132], 512),
                                            ([30] * 17, 512), ([600], 1024), ([700, 500, 300], 2048),
                                            ([2100], 4096),  # past the largest bucket: eager
                                            ([100, 120, 90], 128)])  # a context under the largest bucket
def test_prefill_graphs_match_the_eager_prefill_and_write_only_the_prompts_slots(tmp_path, lengths, context):
    engine = Engine.load(write_random_model(tmp_path, arch="llama", seed=8, max_position_embeddings=context,
                                            **GPU_SHAPE), device="cuda", dtype=torch.bfloat16, num_blocks=GPU_BLOCKS)
    runner, bs = engine.gpu_runner, engine.block_size
    graphs = runner.prefill_graphs
    assert graphs is not None
    assert graphs.fits(sum(lengths), len(lengths)) == (sum(lengths) <= 2048 and len(lengths) <= 16)
    # A prefill whose KV streams out layer by layer replays only up to 512 tokens.
    assert graphs.fits(sum(lengths), len(lengths), streamed=True) == (sum(lengths) <= 512 and len(lengths) <= 16)
    prompts = [r.prompt_ids for r in _requests(lengths, seed=len(lengths))]
    tables, slots, start = [], [], 1  # block 0 stays unused: nothing may be written there
    for p in prompts:
        table = list(range(start, start + -(-len(p) // bs)))
        start += len(table)
        tables.append(table)
        slots += [table[i // bs] * bs + i % bs for i in range(len(p))]
    lens = [len(p) for p in prompts]
    layout = StepLayout(is_prefill=True, seq_lens=lens, context_lens=lens, block_tables=tables,
                        slot_mapping=slots, block_size=bs)
    tokens, positions = [t for p in prompts for t in p], [i for n in lens for i in range(n)]
    rows = [sum(lens[:i + 1]) - 1 for i in range(len(lens))]

    def prefill():
        for layer in engine.cache.layers:
            layer.keys.zero_()
            layer.values.zero_()
        logits = runner.run(tokens, positions, layout, rows).clone()
        kv = [engine.cache.read(t, n) for t, n in zip(tables, lens, strict=True)]
        untouched = all(not layer.keys[start:].any() and not layer.values[start:].any()
                        and not layer.keys[0].any() for layer in engine.cache.layers)
        return logits, kv, untouched

    graphed, kv_graphed, untouched = prefill()
    assert untouched  # padding rows (slot -1) stored nothing, outside the prompts' blocks or inside
    runner.prefill_graphs = None
    eager, kv_eager, _ = prefill()
    assert graphed.shape == eager.shape == (len(lengths), engine.config.vocab_size)
    assert _rel(graphed, eager) < 1e-2
    for (kg, vg), (ke, ve) in zip(kv_graphed, kv_eager, strict=True):
        for a, b in zip(kg + vg, ke + ve, strict=True):
            assert _rel(a, b) < 1e-2

