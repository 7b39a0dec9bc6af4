"""Profiler: the grid is timed into a LatencyProfile the planner can load; unfit points are reported."""

from __future__ import annotations

import argparse

import pytest
import torch
from disagg_planner.api import LatencyProfile
from disagg_planner.latency.fit import fit_decode
from disagg_runtime.engine import Engine
from disagg_runtime.profiler import profile_engine, run_profile


def test_profile_round_trips_through_the_planner_format(llama_dir, tmp_path):
    engine = Engine.load(llama_dir, num_blocks=128)
    profile = profile_engine(engine, prefill_lengths=[8, 32], prefill_batches=[1, 3], decode_batches=[1, 4],
                             contexts=[16, 64], repeats=2)
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = LatencyProfile.load(path)
    assert loaded == profile
    assert loaded.gpu == "CPU" and loaded.model.architecture == "llama" and loaded.model.num_kv_heads == 2
    shape = loaded.shapes[0]
    assert (shape.tp, shape.pp) == (1, 1)
    assert sorted((s.batch_size, s.sum_tokens, s.sum_sq_tokens) for s in shape.prefill) == [
        (1, 8, 64), (1, 32, 1024), (3, 24, 192), (3, 96, 3072)]
    # Two timed decode steps per (batch, context); context grows by one token per step.
    assert sorted((s.batch_size, s.sum_context) for s in shape.decode) == sorted(
        (b, b * (c + k)) for b in (1, 4) for c in (16, 64) for k in (1, 2))
    assert all(s.seconds > 0 for s in shape.prefill + shape.decode)
    assert shape.decode_step_batches == []  # no CUDA graphs on a CPU: a step runs at its own batch
    assert engine.request_ids == [] and engine.free_blocks == engine.total_blocks


def test_points_that_do_not_fit_are_skipped_and_named(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=12, block_size=4)  # 48 tokens of KV; context 512
    run = run_profile(engine, prefill_lengths=[8, 40, 600], prefill_batches=[1, 2], decode_batches=[1, 2],
                      contexts=[8, 30], repeats=1)
    assert {(s.batch_size, s.sum_tokens) for s in run.profile.shapes[0].prefill} == {(1, 8), (2, 16), (1, 40)}
    assert any(note.startswith("prefill 2x40: needs 20 KV blocks") for note in run.skipped)
    assert any(note.startswith("prefill 1x600: longer than the model context") for note in run.skipped)
    assert any(note.startswith("decode 2x30") for note in run.skipped)
    with pytest.raises(ValueError, match="repeats"):
        run_profile(engine, prefill_lengths=[8], prefill_batches=[1], decode_batches=[1], contexts=[8], repeats=0)


def test_a_warm_up_runs_before_the_grid_at_its_largest_fitting_prompt(llama_dir):
    """A GPU fresh from idle runs its first second slow; the warm-up is a token count (every TP rank runs
    the same steps), at the grid's largest prompt the cache holds, and leaves the engine idle."""
    engine = Engine.load(llama_dir, num_blocks=12, block_size=4)  # 48 tokens of KV: 2x40 does not fit
    said: list[str] = []
    run = run_profile(engine, prefill_lengths=[8, 40], prefill_batches=[1, 2], decode_batches=[1], contexts=[8],
                      repeats=1, warmup_tokens=400, log=said.append)
    [warm] = [m for m in said if m.startswith("warm-up")]
    assert warm.startswith("warm-up: 10 x 1 x 40-token prefills"), warm
    assert said.index(warm) == 0, "the warm-up must come before the first timed point"
    assert run.profile.shapes[0].prefill and engine.request_ids == [] and engine.free_blocks == engine.total_blocks
    said.clear()
    run_profile(engine, prefill_lengths=[8], prefill_batches=[1], decode_batches=[1], contexts=[8], repeats=1,
                log=said.append)
    assert not any(m.startswith("warm-up") for m in said), "a CPU engine needs no warm-up by default"


def _cli(argv: list[str]) -> int:
    from disagg_cli import profile

    parser = argparse.ArgumentParser(prog="disagg")
    profile.add_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", *argv])
    return args.run(args)


def test_cli_writes_a_loadable_profile(llama_dir, tmp_path, capsys):
    out = tmp_path / "profiles" / "tiny.json"
    assert _cli([str(llama_dir), "--out", str(out), "--repeats", "1", "--num-blocks", "256"]) == 0
    profile = LatencyProfile.load(out)
    assert profile.shapes[0].prefill and profile.shapes[0].decode
    assert "wrote" in capsys.readouterr().err
    assert _cli([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_mixed_steps_are_timed_and_fitted_by_the_planner(llama_dir):
    from disagg_planner.api import GPU_PRESETS
    from disagg_planner.latency import LatencyModel
    from disagg_planner.latency.mixed import chunk_attention

    engine = Engine.load(llama_dir, num_blocks=256)
    profile = profile_engine(engine, prefill_lengths=[8, 32, 64], prefill_batches=[1], decode_batches=[1, 4],
                             contexts=[16, 64], repeats=1, mixed_batches=[0, 4], mixed_chunks=[8, 32])
    mixed = profile.shapes[0].mixed
    # Two chunks (offset 0 and offset chunk) per (batch, chunk) and timed run.
    assert sorted((s.decode_batch, s.chunk_tokens, s.chunk_attention) for s in mixed) == sorted(
        (b, c, chunk_attention(k * c, c)) for b in (0, 4) for c in (8, 32) for k in (0, 1))
    assert all(s.decode_context == 0 for s in mixed if s.decode_batch == 0)
    assert all(s.decode_context >= 4 * 64 for s in mixed if s.decode_batch == 4)
    assert engine.request_ids == [] and engine.free_blocks == engine.total_blocks
    cpu = GPU_PRESETS["A100-80GB"].model_copy(update={"name": "CPU"})
    model = LatencyModel.from_profile(profile, cpu, 100.0)
    assert (1, 1) in model.mixed_fits
    assert model.mixed_stage_time(1, 1, 4, 300, 1, 32, 32 * 32) > 0


def test_an_overlapping_engine_is_timed_in_steady_state_and_left_empty(llama_dir):
    # The served decode step of an overlapped engine is a call that launches one step and completes the
    # one before: the profile times those calls, the same points as a plain engine, and frees everything.
    engine = Engine.load(llama_dir, num_blocks=128, overlap_decode=True)
    profile = profile_engine(engine, prefill_lengths=[8], prefill_batches=[1], decode_batches=[1, 4],
                             contexts=[16], repeats=2)
    assert sorted((s.batch_size, s.sum_context) for s in profile.shapes[0].decode) == [
        (1, 17), (1, 18), (4, 68), (4, 72)]
    assert engine.request_ids == [] and engine.free_blocks == engine.total_blocks
    assert not engine.decode_in_flight
    # The planner's simulators then choose what follows a decode step when that step starts, as this engine does.
    assert profile.shapes[0].overlapped_decode
    plain = profile_engine(Engine.load(llama_dir, num_blocks=128, overlap_decode=False), prefill_lengths=[8],
                           prefill_batches=[1], decode_batches=[1], contexts=[16], repeats=1)
    assert not plain.shapes[0].overlapped_decode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_graph_replaying_engine_writes_the_batches_its_steps_are_padded_to(tmp_path):
    from disagg_runtime.engine.gpu import CAPTURE_SIZES
    from disagg_runtime.models.testing import write_random_model

    model = write_random_model(tmp_path, arch="llama", seed=3, num_hidden_layers=2, hidden_size=256,
                               intermediate_size=512, num_attention_heads=2, num_key_value_heads=1)
    engine = Engine.load(model, device="cuda", num_blocks=512)
    profile = profile_engine(engine, prefill_lengths=[16], prefill_batches=[1], decode_batches=[1, 40],
                             contexts=[32, 64], repeats=2)
    shape = profile.shapes[0]
    assert shape.decode_step_batches == list(CAPTURE_SIZES)
    fit = fit_decode(shape.decode, "decode", shape.decode_step_batches)
    assert [b for b, _ in fit.bases] == [1, 48]  # the batch-40 steps ran in the 48 graph
