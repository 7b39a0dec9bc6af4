"""Profiler: the grid is timed into a LatencyProfile the planner can load; unfit points are reported."""

from __future__ import annotations

import argparse

import pytest
from disagg_planner.api import LatencyProfile
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
