"""Served-path overheads in a profile: LatencyModel adds exactly them where they are paid (decode steps,
each request's latency; the decode step's per-batch table where there is one); old profiles load."""

from __future__ import annotations

import json

import pytest
from disagg_planner import simulator as sim
from disagg_planner.api import (
    GPU_PRESETS,
    MODEL_PRESETS,
    DecodeOverheadPoint,
    DecodeSample,
    LatencyProfile,
    PrefillSample,
    ServedOverhead,
    ShapeProfile,
)
from disagg_planner.latency import LatencyModel, ProfileError
from disagg_planner.workloads import SimRequest
from pydantic import ValidationError

A100 = GPU_PRESETS["A100-80GB"]
PRE = (0.0165, 9.26e-5, 6.47e-9)  # DistServe's OPT-13B A100 fits, seconds
DEC = (0.0199, 3.85e-5, 6.27e-7)
COLOCATED = ServedOverhead(prefill_s=0.004, decode_step_s=0.0015, decode_per_seq_s=0.0002)
DISAGG = ServedOverhead(prefill_s=0.006, decode_step_s=0.001, decode_per_seq_s=0.0003, kv_handoff_s=0.05)


def engine_shape() -> ShapeProfile:
    prefill = [PrefillSample(batch_size=b, sum_tokens=b * n, sum_sq_tokens=b * n * n,
                             seconds=PRE[0] + PRE[1] * b * n + PRE[2] * b * n * n)
               for b in (1, 2, 4) for n in (128, 512, 1024)]
    decode = [DecodeSample(batch_size=b, sum_context=b * c, seconds=DEC[0] + DEC[1] * b + DEC[2] * b * c)
              for b in (1, 8, 32) for c in (64, 512, 1500)]
    return ShapeProfile(prefill=prefill, decode=decode)


def profile(**served: ServedOverhead) -> LatencyProfile:
    return LatencyProfile(model=MODEL_PRESETS["opt-13b"], gpu=A100.name, shapes=[engine_shape()],
                          served=served)


def models(mode: str | None = None, **served: ServedOverhead) -> tuple[LatencyModel, LatencyModel]:
    return (LatencyModel.from_profile(profile(), A100, 300.0),
            LatencyModel.from_profile(profile(**served), A100, 300.0, served_mode=mode))


def test_overheads_lengthen_each_step_by_exactly_the_profiled_amount():
    bare, served = models("colocated", colocated=COLOCATED)
    o = COLOCATED
    for lengths in ([512], [128, 900, 64]):  # the hops delay the request, they do not occupy the engine
        assert served.prefill_time(1, 1, lengths) == bare.prefill_time(1, 1, lengths)
    assert served.request_latency_s == o.prefill_s and bare.request_latency_s == 0
    for batch, context in ((1, 700), (32, 32 * 900)):
        gap = served.decode_time(1, 1, batch, context) - bare.decode_time(1, 1, batch, context)
        assert gap == pytest.approx(o.decode_step_s + o.decode_per_seq_s * batch, rel=1e-9)
        assert served.decode_coefficients(1, 1, batch)[1] == bare.decode_coefficients(1, 1, batch)[1]
    # A chunked-prefill step pays one decode step's overhead; its chunks' requests pay their hops as latency.
    gap = served.mixed_stage_time(1, 1, 16, 16 * 500, 2, 512, 300_000) - bare.mixed_stage_time(
        1, 1, 16, 16 * 500, 2, 512, 300_000)
    assert gap == pytest.approx(o.decode_step_s + 16 * o.decode_per_seq_s, rel=1e-9)
    assert served.kv_handoff_s == 0 and bare.kv_handoff_s == 0


@pytest.mark.parametrize("mode", ["colocated", "colocated_chunked", "disaggregated"])
def test_the_request_latency_moves_every_token_of_every_request_and_no_step(mode):
    """Under load as alone: TTFT and end-to-end time grow by exactly prefill_s, TPOT and KV do not change
    (a latency charged to the engine's steps would have slowed the queue behind every prefill)."""
    hops = ServedOverhead(prefill_s=0.02)
    served_mode = "disaggregated" if mode == "disaggregated" else "colocated"
    bare, served = models(served_mode, **{served_mode: hops})
    trace = [SimRequest(0.01 * k, 300 + 37 * (k % 5), 20 + k % 7) for k in range(120)]
    one = sim.PhaseShape(1, 1, 1)
    run = {"colocated": lambda m: sim.simulate_colocated(sim.ColocatedConfig(one, 2048), m, trace),
           "colocated_chunked": lambda m: sim.simulate_colocated_chunked(sim.ChunkedColocatedConfig(one, 512), m, trace),
           "disaggregated": lambda m: sim.simulate_disaggregated(sim.DisaggConfig(one, one, 300.0), m, trace)}[mode]
    a, b = run(bare), run(served)
    assert b.ttfts == pytest.approx(a.ttfts + 0.02, abs=1e-12)
    assert b.tpots == pytest.approx(a.tpots, abs=1e-12)
    assert [r.e2e for r in b.results] == pytest.approx([r.e2e + 0.02 for r in a.results], abs=1e-12)
    assert b.peak_kv_tokens == a.peak_kv_tokens


def test_a_pipelined_step_pays_the_overhead_once_not_per_stage():
    bare, served = models("colocated", colocated=COLOCATED)
    stage_gap = served.decode_time(1, 4, 8, 8 * 600) - bare.decode_time(1, 4, 8, 8 * 600)
    assert stage_gap == pytest.approx((COLOCATED.decode_step_s + 8 * COLOCATED.decode_per_seq_s) / 4, rel=1e-9)


def test_the_mode_picks_its_own_overheads_and_a_missing_mode_is_an_error():
    both = profile(colocated=COLOCATED, disaggregated=DISAGG)
    disagg = LatencyModel.from_profile(both, A100, 300.0, served_mode="disaggregated")
    assert disagg.served == DISAGG and disagg.kv_handoff_s == 0.05
    assert LatencyModel.from_profile(profile(colocated=COLOCATED), A100, 300.0).served == COLOCATED
    # With both and no mode, one model serves both simulators: it charges the larger of each.
    merged = LatencyModel.from_profile(both, A100, 300.0).served
    assert (merged.prefill_s, merged.decode_step_s, merged.decode_per_seq_s, merged.kv_handoff_s) == (
        0.006, 0.0015, 0.0003, 0.05)
    with pytest.raises(ProfileError, match="disagg profile --served disaggregated"):
        LatencyModel.from_profile(profile(colocated=COLOCATED), A100, 300.0, served_mode="disaggregated")
    assert LatencyModel.from_profile(profile(), A100, 300.0, served_mode="colocated").served is None


def test_the_kv_handoff_delays_decode_not_the_first_token():
    bare, served = models("disaggregated", disaggregated=ServedOverhead(kv_handoff_s=0.05))
    cfg = sim.DisaggConfig(sim.PhaseShape(1, 1, 1), sim.PhaseShape(1, 1, 1), 300.0)
    trace = [SimRequest(0.0, 512, 11)]
    a, b = sim.simulate_disaggregated(cfg, bare, trace), sim.simulate_disaggregated(cfg, served, trace)
    assert b.ttfts[0] == pytest.approx(a.ttfts[0], rel=1e-12)
    assert b.tpots[0] - a.tpots[0] == pytest.approx(0.05 / 10, rel=1e-6)


def test_a_profile_without_the_served_section_still_loads(tmp_path):
    old = profile().model_dump(mode="json", by_alias=True)
    old.pop("served")
    old["version"] = 1
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    loaded = LatencyProfile.load(path)
    assert loaded.served == {} and loaded.version == 1
    assert LatencyModel.from_profile(loaded, A100, 300.0).served is None
    written = profile(disaggregated=DISAGG)
    written.save(tmp_path / "v2.json")
    assert LatencyProfile.load(tmp_path / "v2.json") == written
    assert "kvHandoffS" in (tmp_path / "v2.json").read_text()


# The H200 run's served decode overhead (bench/predicted_vs_measured.py, llama-8b, colocated): ~0 up to 32
# sequences, then far above the line the repeated median fits through the many small batches.
KNEE = [DecodeOverheadPoint(batch_size=b, seconds=s)
        for b, s in ((32, 0.0), (64, 0.13e-3), (128, 0.25e-3), (256, 0.86e-3))]
KNEE_LINE = {"decode_step_s": 0.016e-3, "decode_per_seq_s": 0.0006e-3}


def test_a_decode_step_pays_the_per_batch_table_not_the_line():
    table = ServedOverhead(decode_by_batch=KNEE, **KNEE_LINE)
    bare, served = models("colocated", colocated=table)
    tail = (0.86e-3 - 0.25e-3) / 128  # the last segment's per-sequence growth

    def step_gap(batch: int, pp: int = 1) -> float:
        return served.decode_time(1, pp, batch, batch * 800) - bare.decode_time(1, pp, batch, batch * 800)

    assert step_gap(128) == pytest.approx(0.25e-3, rel=1e-9)  # not the line's 0.09 ms
    assert step_gap(96) == pytest.approx((0.13e-3 + 0.25e-3) / 2, rel=1e-9)  # halfway between 64 and 128
    assert step_gap(200) == pytest.approx(0.25e-3 + tail * 72, rel=1e-9)
    assert step_gap(512) == pytest.approx(0.86e-3 + tail * 256, rel=1e-9)  # past the last point: its slope goes on
    assert step_gap(8) == step_gap(1) == pytest.approx(0.0, abs=1e-15)  # below the first point: its value
    assert step_gap(128, pp=4) == pytest.approx(0.25e-3 / 4, rel=1e-9)  # once per step, not per stage
    mixed = served.mixed_stage_time(1, 1, 128, 128 * 500, 2, 512, 300_000) - bare.mixed_stage_time(
        1, 1, 128, 128 * 500, 2, 512, 300_000)
    assert mixed == pytest.approx(0.25e-3, rel=1e-9)


def test_without_a_table_the_line_is_charged_and_one_point_grows_by_the_line_slope():
    line = ServedOverhead(**KNEE_LINE)
    assert line.decode_overhead_s(128) == pytest.approx(0.016e-3 + 128 * 0.0006e-3, rel=1e-12)
    one = ServedOverhead(decode_by_batch=[KNEE[2]], **KNEE_LINE)
    assert one.decode_overhead_s(16) == 0.25e-3
    assert one.decode_overhead_s(228) == pytest.approx(0.25e-3 + 100 * 0.0006e-3, rel=1e-12)


@pytest.mark.parametrize(("points", "message"), [
    ([(64, 0.2e-3), (128, 0.1e-3)], "must not fall as the batch grows"),
    ([(128, 0.1e-3), (64, 0.2e-3)], "strictly increasing batchSize"),
    ([(64, 0.1e-3), (64, 0.2e-3)], "strictly increasing batchSize"),
    ([(64, -0.1e-3)], "greater than or equal to 0"),
])
def test_a_table_that_is_unsorted_or_falls_is_refused(points, message):
    wire = {"decodeByBatch": [{"batchSize": b, "seconds": s} for b, s in points]}
    with pytest.raises(ValidationError, match=message):
        ServedOverhead.model_validate(wire)


def test_the_table_travels_in_camel_case_and_loads_back(tmp_path):
    written = profile(colocated=ServedOverhead(decode_by_batch=KNEE, **KNEE_LINE))
    written.save(tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    assert '"decodeByBatch"' in text and '"batchSize": 256' in text
    assert LatencyProfile.load(tmp_path / "p.json") == written


def test_the_merged_overhead_of_two_modes_is_at_least_each_and_the_max_where_probed():
    colocated = ServedOverhead(decode_by_batch=KNEE, **KNEE_LINE)
    # Disaggregated: a line above the knee's table at 256 but rising more slowly, so the table's continued
    # slope overtakes it past the last probed batch (at ~361 sequences).
    disagg = ServedOverhead(decode_step_s=1.0e-3, decode_per_seq_s=1e-6)
    other = ServedOverhead(decode_by_batch=[DecodeOverheadPoint(batch_size=b, seconds=s)
                                            for b, s in ((16, 0.05e-3), (48, 0.3e-3), (96, 0.3e-3))])
    for modes in ((colocated, disagg), (colocated, other)):
        both = profile(colocated=modes[0], disaggregated=modes[1])
        merged = LatencyModel.from_profile(both, A100, 300.0).served
        assert merged is not None and merged.decode_by_batch

        def top(batch: int, modes=modes) -> float:
            return max(o.decode_overhead_s(batch) for o in modes)

        for batch in range(1, 4097):
            assert merged.decode_overhead_s(batch) >= top(batch) - 1e-15, batch
        probed = {p.batch_size for o in modes for p in o.decode_by_batch}
        for batch in (*probed, 400, 1000, 4096):
            assert merged.decode_overhead_s(batch) == pytest.approx(top(batch), rel=1e-9), batch
    # The simulator's steps pay it too: a step of 128 under the merged model pays the larger mode's overhead.
    bare, served = models(None, colocated=colocated, disaggregated=disagg)
    gap = served.decode_time(1, 1, 128, 128 * 800) - bare.decode_time(1, 1, 128, 128 * 800)
    assert gap == pytest.approx(max(colocated.decode_overhead_s(128), disagg.decode_overhead_s(128)), rel=1e-9)
