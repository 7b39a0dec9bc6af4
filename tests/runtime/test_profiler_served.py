"""The served-path profiler: the real router and workers are probed and their overheads land in the profile."""

from __future__ import annotations

import argparse
import os

import pytest
from disagg_planner.api import GPU_PRESETS, LatencyProfile, ServedOverhead, ServedProbe
from disagg_planner.latency import LatencyModel
from disagg_runtime.benchclient.client import RequestRecord
from disagg_runtime.serve.affinity import parse_cpu_affinity
from disagg_runtime.serve.local import LocalCluster
from disagg_runtime.served_profiler import ServedProbePlan, steady_gaps


def _parser() -> argparse.ArgumentParser:
    from disagg_cli import profile

    parser = argparse.ArgumentParser(prog="disagg")
    profile.add_parser(parser.add_subparsers())
    return parser


def test_served_overheads_appear_in_a_profile_written_on_cpu(llama_dir, tmp_path, capsys):
    out = tmp_path / "served.json"
    args = _parser().parse_args(["profile", str(llama_dir), "--out", str(out), "--repeats", "1", "--num-blocks", "256",
                                 "--served", "colocated", "disaggregated", "--served-prompt-tokens", "24", "48",
                                 "--served-output-tokens", "24", "--served-singles", "2", "--served-load-rate", "25",
                                 "--served-load-requests", "60"])
    assert args.run(args) == 0, capsys.readouterr().err
    profile = LatencyProfile.load(out)
    assert set(profile.served) == {"colocated", "disaggregated"}
    for mode, served in profile.served.items():
        kinds = {(p.kind, p.batch_size, p.tokens) for p in served.probes}
        # Singles at both lengths; a burst per decode batch of the small grid (1, 4, 16: all fit 256 blocks),
        # each measured at the most of its requests that decoded together.
        assert {("prefill", 1, 24), ("prefill", 1, 48)} <= kinds, mode
        decode = sorted(p.batch_size for p in served.probes if p.kind == "decode")
        assert len(decode) == 3 and decode[0] == 1 and decode[-1] > 1 and decode[-1] <= 16, mode
        assert all(p.measured_seconds > 0 and p.engine_seconds > 0 for p in served.probes)
        assert min(served.prefill_s, served.decode_step_s, served.decode_per_seq_s) >= 0
        # The values are the probes' measured - engine differences, fitted as documented.
        main = next(p for p in served.probes if p.kind == "prefill" and p.tokens == 24)
        assert served.prefill_s == pytest.approx(max(0.0, main.measured_seconds - main.engine_seconds))
        table = served.decode_by_batch
        assert [p.batch_size for p in table] == sorted(set(decode)), mode
        assert [p.seconds for p in table] == sorted(p.seconds for p in table), mode
    assert profile.served["colocated"].kv_handoff_s is None
    # Colocated, the loaded probe: prefills launched beside decodes, and where its steps reached a probed
    # batch, that point of the table is theirs. Disaggregated workers run no such load.
    colocated = profile.served["colocated"]
    behind = [p for p in colocated.probes if p.kind == "prefill_behind_decode"]
    assert len(behind) == 1 and behind[0].samples >= 10 and behind[0].tokens in range(22, 27)
    assert colocated.prefill_behind_decode_s == pytest.approx(behind[0].measured_seconds - behind[0].engine_seconds)
    assert any(p.kind == "decode_loaded" for p in colocated.probes)
    assert profile.served["disaggregated"].prefill_behind_decode_s is None
    assert not {p.kind for p in profile.served["disaggregated"].probes} & {"decode_loaded", "prefill_behind_decode"}
    handoffs = {p.tokens for p in profile.served["disaggregated"].probes if p.kind == "kv_handoff"}
    assert handoffs == {24, 48} and profile.served["disaggregated"].kv_handoff_s is not None
    # The planner reads them: every step of the served model is at least the engine's.
    cpu = GPU_PRESETS["A100-80GB"].model_copy(update={"name": "CPU"})
    bare = LatencyModel.from_profile(profile.model_copy(update={"served": {}}), cpu, 100.0)
    for mode in profile.served:
        served = LatencyModel.from_profile(profile, cpu, 100.0, served_mode=mode)
        assert served.prefill_time(1, 1, [24]) >= bare.prefill_time(1, 1, [24])
        assert served.decode_time(1, 1, 4, 4 * 30) >= bare.decode_time(1, 1, 4, 4 * 30)
    assert "served path of colocated and disaggregated" in capsys.readouterr().err


def test_served_flags_parse_and_bad_ones_are_refused(llama_dir, tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["profile", str(llama_dir), "--out", "p.json"])
    assert args.served == [] and args.cpu_affinity is None
    args = parser.parse_args(["profile", str(llama_dir), "--out", "p.json", "--served", "disaggregated",
                              "--cpu-affinity", "prefill=0,decode=0", "--served-output-tokens", "16"])
    assert args.served == ["disaggregated"] and args.cpu_affinity == {"prefill": {0}, "decode": {0}}
    for bad in (["--served", "chunked"], ["--cpu-affinity", "gpu=0"], ["--served-output-tokens", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["profile", str(llama_dir), "--out", "p.json", *bad])
    # Probes longer than the model's context are refused before any process starts.
    args = parser.parse_args(["profile", str(llama_dir), "--out", str(tmp_path / "p.json"), "--repeats", "1",
                              "--num-blocks", "128", "--served", "colocated", "--served-prompt-tokens", "600"])
    assert args.run(args) == 2
    assert "exceed the model context" in capsys.readouterr().err
    with pytest.raises(ValueError, match="output_tokens"):
        ServedProbePlan(prompt_tokens=[8], output_tokens=2, decode_batches=[1])


def test_cpu_affinity_parses_roles_instances_and_ranges():
    assert parse_cpu_affinity("prefill=0,decode=0") == {"prefill": {0}, "decode": {0}}
    if len(os.sched_getaffinity(0)) >= 2:
        assert parse_cpu_affinity("prefill=0-1,decode-1=1,router=0") == {
            "prefill": {0, 1}, "decode-1": {1}, "router": {0}}
    for bad, message in (("0,1", "start with NAME=CORES"), ("worker=0", "no process name"),
                         ("prefill=x", "not a core"), ("prefill=2-1", "not a core"),
                         (f"prefill={max(os.sched_getaffinity(0)) + 1}", "may use only")):
        with pytest.raises(ValueError, match=message):
            parse_cpu_affinity(bad)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPU cores")
def test_local_cluster_pins_each_role_to_its_cores(llama_dir):
    cores = sorted(os.sched_getaffinity(0))[:2]
    with LocalCluster(model_dir=llama_dir, port=0, worker_args=["--device", "cpu", "--num-kv-blocks", "64"],
                      cpu_affinity={"prefill": {cores[0]}, "decode": {cores[1]}}) as cluster:
        assert os.sched_getaffinity(cluster.processes["prefill-0"].pid) == {cores[0]}
        assert os.sched_getaffinity(cluster.processes["decode-0"].pid) == {cores[1]}
        assert os.sched_getaffinity(cluster.processes["router"].pid) == os.sched_getaffinity(0)


def test_steady_gaps_are_those_while_the_most_requests_decode():
    def rec(i: int, times: list[float]) -> RequestRecord:
        return RequestRecord(index=i, input_len=10, output_len=len(times), scheduled=0.0, token_times=times)

    # The second request decodes from 2.0 (its second token) and the first up to 5.0: gaps inside [2, 5] count.
    together, gaps = steady_gaps([rec(0, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), rec(1, [1.5, 2.0, 2.5, 3.5, 5.5])], 10)
    assert together == 2
    assert sorted(gaps) == sorted([(1.0, 12), (1.0, 13), (1.0, 14), (0.5, 11), (1.0, 12)])
    # Outputs too short to overlap: each decoded alone, and that is the batch measured.
    together, gaps = steady_gaps([rec(0, [0.0, 1.0, 2.0]), rec(1, [3.0, 4.0, 5.0])], 10)
    assert together == 1 and sorted(gaps) == [(1.0, 11), (1.0, 11)]


def test_serve_local_takes_the_cpu_affinity_flag():
    from disagg_runtime.serve.options import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--local", "--cpu-affinity", "prefill=0,decode=0"])
    assert args.cpu_affinity == {"prefill": {0}, "decode": {0}}
    assert parser.parse_args(["--local"]).cpu_affinity is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--local", "--cpu-affinity", "decode"])


def test_the_decode_overhead_line_shrugs_off_one_spiked_point():
    from disagg_runtime.served_profiler import robust_line

    batches = [1, 2, 4, 8, 16, 32]
    line = [0.001 + 0.0002 * b for b in batches]
    assert robust_line(batches, line) == pytest.approx((0.001, 0.0002))
    spiked = [*line[:3], line[3] + 0.05, *line[4:]]  # another job ran during the burst of 8
    assert robust_line(batches, spiked) == pytest.approx((0.001, 0.0002))
    assert robust_line([1, 4], [0.002, 0.001]) == (pytest.approx(0.0015), 0.0)  # never a falling line
    assert robust_line([4], [-0.001]) == (0.0, 0.0)


def _decode_probes(differences: dict[int, float]) -> list[ServedProbe]:
    """A single and a burst per batch, each burst `differences[batch]` slower than the engine step, with as
    many gaps as a real burst of 24 tokens leaves (so a wide burst has far more samples than a narrow one)."""
    single = ServedProbe(kind="prefill", batch_size=1, tokens=763, samples=6, measured_seconds=0.026,
                         engine_seconds=0.022)
    return [single, *(ServedProbe(kind="decode", batch_size=b, tokens=763, samples=344 * b,
                                  measured_seconds=0.0045 + 3.6e-5 * b + d, engine_seconds=0.0045 + 3.6e-5 * b)
                       for b, d in differences.items())]


def _overhead(probes: list[ServedProbe]) -> ServedOverhead:
    from disagg_planner.latency.fit import LinearFit
    from disagg_runtime.served_profiler import _EngineTimes, overhead_from_probes

    engine = _EngineTimes(prefill=LinearFit(0.0165, 9.3e-5, 6.5e-9, 0.0), decode=LinearFit(0.0045, 3.6e-5, 0.0, 0.0))
    return overhead_from_probes(probes, {}, "colocated", engine, kv_bytes_per_token=131072)


def test_the_decode_table_reproduces_a_knee_the_line_misses():
    from disagg_runtime.served_profiler import decode_by_batch_text, robust_line

    # The H200 run's shape; -2 µs at 32 is the engine fit running a hair slow, which the served path cannot undo.
    knee = {16: 0.0, 32: -0.002e-3, 64: 0.13e-3, 128: 0.25e-3, 256: 0.86e-3}
    served = _overhead(_decode_probes(knee))
    assert [p.batch_size for p in served.decode_by_batch] == [16, 32, 64, 128, 256]
    assert [p.seconds for p in served.decode_by_batch] == pytest.approx([0.0, 0.0, 0.13e-3, 0.25e-3, 0.86e-3],
                                                                        abs=1e-12)
    assert served.decode_overhead_s(128) == pytest.approx(0.25e-3, abs=1e-12)
    # The line is still written, as before, as the table's summary.
    probes = [p for p in served.probes if p.kind == "decode"]
    line = robust_line([p.batch_size for p in probes], [p.measured_seconds - p.engine_seconds for p in probes])
    assert (served.decode_step_s, served.decode_per_seq_s) == pytest.approx(line)
    assert decode_by_batch_text(served.decode_by_batch) == "decode +0.00/0.00/0.13/0.25/0.86 ms at batch 16/32/64/128/256"


def test_a_noisy_dip_is_pooled_so_the_table_never_falls():
    served = _overhead(_decode_probes({16: 0.0, 32: 0.0, 64: 0.2e-3, 128: 0.1e-3, 256: 0.86e-3}))
    seconds = [p.seconds for p in served.decode_by_batch]
    assert seconds == sorted(seconds)
    # Least squares pools the two probes that disagree to their mean, one weight each: the burst of 128's
    # twice-as-many samples are the same engine steps seen by twice the requests, not twice the evidence.
    assert seconds == pytest.approx([0.0, 0.0, 0.15e-3, 0.15e-3, 0.86e-3], abs=1e-12)
    assert served.decode_overhead_s(96) == pytest.approx(0.15e-3, abs=1e-12)


def test_bursts_that_peaked_at_the_same_batch_share_one_point():
    # Disaggregated, the bursts of 24 and 32 can both plateau at 20 decoding together (see `steady_gaps`).
    probes = _decode_probes({8: 0.01e-3, 20: 0.04e-3})
    probes.append(probes[-1].model_copy(update={"measured_seconds": probes[-1].measured_seconds + 0.02e-3}))
    served = _overhead(probes)
    assert [(p.batch_size, p.seconds) for p in served.decode_by_batch] == [
        (8, pytest.approx(0.01e-3, abs=1e-12)), (20, pytest.approx(0.05e-3, abs=1e-12))]
