"""Latency model: profile fitting, shape scaling, analytic roofline, memory."""

from __future__ import annotations

import numpy as np
import pytest
from disagg_planner.api import (
    GPU_PRESETS,
    MODEL_PRESETS,
    DecodeSample,
    LatencyProfile,
    PrefillSample,
    ShapeProfile,
)
from disagg_planner.latency import LatencyModel, ProfileError, ShapeError, fit_linear, kv_transfer_time
from disagg_planner.latency.fit import fit_decode
from disagg_planner.latency.shape import allreduce_time

A100 = GPU_PRESETS["A100-80GB"]
OPT13 = MODEL_PRESETS["opt-13b"]


def synthetic_shape(tp: int, pre: tuple[float, float, float], dec: tuple[float, float, float],
                    noise: float = 0.0, seed: int = 0) -> ShapeProfile:
    rng = np.random.default_rng(seed)
    prefill, decode = [], []
    for batch in (1, 2, 4, 8):
        for length in (32, 128, 512, 1024):
            s, s2 = batch * length, batch * length * length
            t = (pre[0] + pre[1] * s + pre[2] * s2) * (1 + noise * rng.standard_normal())
            prefill.append(PrefillSample(batch_size=batch, sum_tokens=s, sum_sq_tokens=s2, seconds=t))
    for batch in (1, 8, 32, 128):
        for ctx in (64, 512, 1500):
            t = (dec[0] + dec[1] * batch + dec[2] * batch * ctx) * (1 + noise * rng.standard_normal())
            decode.append(DecodeSample(batch_size=batch, sum_context=batch * ctx, seconds=t))
    return ShapeProfile(tp=tp, pp=1, prefill=prefill, decode=decode)


PRE = (0.0165, 9.26e-5, 6.47e-9)  # DistServe's OPT-13B A100 prefill fit, in seconds
DEC = (0.0199, 3.85e-5, 6.27e-7)


def profile_of(*shapes: ShapeProfile, gpu: str = "A100-80GB") -> LatencyProfile:
    return LatencyProfile(model=OPT13, gpu=gpu, shapes=list(shapes))


def test_fit_recovers_known_coefficients_exactly() -> None:
    model = LatencyModel.from_profile(profile_of(synthetic_shape(1, PRE, DEC)), A100, 300.0)
    assert model.source == "profile"
    fit = model.prefill_fits[(1, 1)]
    assert (fit.a, fit.b, fit.c) == pytest.approx(PRE, rel=1e-6)
    dfit = model.decode_fits[(1, 1)]
    assert (dfit.a, dfit.b, dfit.c) == pytest.approx(DEC, rel=1e-6)
    assert model.prefill_time(1, 1, [300, 200]) == pytest.approx(PRE[0] + PRE[1] * 500 + PRE[2] * (300**2 + 200**2))
    assert model.decode_time(1, 1, 16, 16_000) == pytest.approx(DEC[0] + DEC[1] * 16 + DEC[2] * 16_000)


def test_fit_is_robust_to_measurement_noise() -> None:
    model = LatencyModel.from_profile(profile_of(synthetic_shape(1, PRE, DEC, noise=0.02, seed=7)), A100, 300.0)
    fit = model.prefill_fits[(1, 1)]
    assert fit.b == pytest.approx(PRE[1], rel=0.05)
    assert fit.rms_relative_error == pytest.approx(0.02, abs=0.01)
    assert model.decode_time(1, 1, 64, 64 * 800) == pytest.approx(DEC[0] + DEC[1] * 64 + DEC[2] * 64 * 800, rel=0.03)


def test_a_sample_the_form_cannot_explain_is_left_out_and_counted() -> None:
    """One prefill caught slow (a clock ramp, another process) must not bend the fit for every step."""
    tokens = np.array([256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192], dtype=float)
    seconds = PRE[0] + PRE[1] * tokens + PRE[2] * tokens**2
    clean = fit_linear(tokens, tokens**2, seconds, "clean")
    assert clean.outliers == 0
    slow = seconds.copy()
    slow[0] *= 1.4
    fit = fit_linear(tokens, tokens**2, slow, "one slow sample")
    assert fit.outliers == 1 and fit.rms_relative_error < 1e-9
    assert (fit.a, fit.b, fit.c) == pytest.approx(PRE, rel=1e-6)
    # Noise everywhere is not an outlier: nothing is left out of a uniformly noisy profile.
    noisy = seconds * (1 + 0.03 * np.random.default_rng(3).standard_normal(len(seconds)))
    assert fit_linear(tokens, tokens**2, noisy, "noisy").outliers == 0
    # However bad the samples, at most a fifth of them is left out.
    wild = seconds * np.array([1, 2, 0.5, 1, 3, 1, 0.3, 1, 1, 2.5])
    assert fit_linear(tokens, tokens**2, wild, "wild").outliers <= 2


def _decode_samples(step, batches=(1, 4, 16, 32, 64, 128, 256), contexts=(512, 1024, 2048)):
    return [DecodeSample(batch_size=b, sum_context=b * ctx, seconds=step(b) + 2.7e-8 * b * ctx)
            for b in batches for ctx in contexts]


def test_decode_follows_the_profiled_batch_curve_where_a_line_cannot() -> None:
    """GPU decode is flat in the batch while the weights dominate, then steeper: the H200 shape of it."""
    def step(b):  # seconds at no context: flat to 32, then 17 us per sequence
        return 0.0046 + 2e-6 * b + 17e-6 * max(0, b - 32)

    samples = _decode_samples(step)
    line = fit_linear([s.batch_size for s in samples], [s.sum_context for s in samples],
                      [s.seconds for s in samples], "line")
    fit = fit_decode(samples, "curve")
    misses = [abs(line(s.batch_size, s.sum_context) / s.seconds - 1) for s in samples]
    assert max(misses) > 0.04  # what the plain line does to this shape
    for s in samples:
        assert fit(s.batch_size, s.sum_context) == pytest.approx(s.seconds, rel=2e-3)
    assert fit.rms_relative_error < 2e-3
    # Between profiled batches: on the segment; past the largest: along the last one.
    assert fit.base(48) == pytest.approx((step(32) + step(64)) / 2, rel=1e-3)
    assert fit.base(512) == pytest.approx(step(256) + (step(256) - step(128)) * 2, rel=1e-3)
    model = LatencyModel.from_profile(profile_of(ShapeProfile(tp=1, pp=1, prefill=synthetic_shape(1, PRE, DEC).prefill,
                                                              decode=samples)), A100, 300.0)
    assert model.decode_time(1, 1, 64, 64 * 800) == pytest.approx(step(64) + 2.7e-8 * 64 * 800, rel=2e-3)


def test_decode_bases_never_fall_with_the_batch() -> None:
    def step(b):
        return 0.005 * (0.97 if b == 8 else 1.0) + 1e-5 * b  # batch 8 caught fast

    fit = fit_decode(_decode_samples(step, batches=(1, 4, 8, 16)), "noisy")
    bases = [y for _, y in fit.bases]
    assert bases == sorted(bases)


GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def _padded_step(b):
    """An engine replaying graphs at GRAPH_SIZES: the weights' part is that of the graph a step runs in."""
    size = next((g for g in GRAPH_SIZES if g >= b), b)
    return 0.0046 + 2e-6 * size + 17e-6 * max(0, size - 32)


def test_a_step_costs_the_base_of_the_graph_it_is_padded_to() -> None:
    samples = _decode_samples(_padded_step, batches=GRAPH_SIZES)
    fit = fit_decode(samples, "graphs", GRAPH_SIZES)
    for b in (3, 33, 40, 47, 48, 65, 90, 100, 128):
        assert fit.base(b) == pytest.approx(_padded_step(b), rel=2e-3), b
    assert fit.base(33) == fit.base(48) > fit.base(32)
    assert fit.base(160) > fit.base(128)  # past the largest graph: eager, at its own size along the last segment
    # Without the sizes the same samples interpolate: batch 33 would cost about batch 32's weights.
    assert fit_decode(samples, "no graphs").base(33) < 0.99 * fit.base(33)


def test_samples_between_graph_sizes_are_keyed_by_the_graph_they_ran_in() -> None:
    samples = _decode_samples(_padded_step, batches=(1, 8, 40, 64, 100, 128))
    fit = fit_decode(samples, "graphs", GRAPH_SIZES)
    assert [b for b, _ in fit.bases] == [1, 8, 48, 64, 128]
    assert fit.base(33) == pytest.approx(_padded_step(40), rel=2e-3)


def test_the_latency_model_pads_decode_steps_as_the_profiled_engine_does() -> None:
    prefill = synthetic_shape(1, PRE, DEC).prefill
    shape = ShapeProfile(tp=1, pp=1, prefill=prefill, decode=_decode_samples(_padded_step, batches=GRAPH_SIZES),
                         decode_step_batches=list(GRAPH_SIZES))
    profile = LatencyProfile.model_validate_json(profile_of(shape).model_dump_json(by_alias=True))
    assert '"decodeStepBatches"' in profile_of(shape).model_dump_json(by_alias=True)
    model = LatencyModel.from_profile(profile, A100, 300.0)
    assert model.decode_time(1, 1, 33, 33 * 800) == pytest.approx(_padded_step(48) + 2.7e-8 * 33 * 800, rel=2e-3)
    plain = LatencyModel.from_profile(profile_of(shape.model_copy(update={"decode_step_batches": []})), A100, 300.0)
    assert plain.decode_time(1, 1, 33, 33 * 800) < model.decode_time(1, 1, 33, 33 * 800)


@pytest.mark.parametrize("sizes", [[0, 4], [4, 4], [8, 4]])
def test_decode_step_batches_must_be_positive_and_increasing(sizes) -> None:
    with pytest.raises(ValueError, match="decodeStepBatches"):
        ShapeProfile(tp=1, pp=1, decode_step_batches=sizes)


def test_fit_never_returns_negative_coefficients() -> None:
    x1 = np.arange(1, 50, dtype=float)
    x2 = x1**2
    seconds = 1.0 + 0.5 * x1 - 0.001 * x2  # a concave truth: the quadratic term must clamp to 0
    fit = fit_linear(x1, x2, seconds, "test")
    assert min(fit.a, fit.b, fit.c) >= 0 and fit.c == 0


def test_unprofiled_shape_scales_compute_and_adds_allreduce() -> None:
    model = LatencyModel.from_profile(profile_of(synthetic_shape(1, PRE, DEC)), A100, 300.0)
    tokens = 4096
    t1 = model.prefill_stage_time(1, 1, 4, tokens, 4 * 1024**2)
    t2 = model.prefill_stage_time(2, 1, 4, tokens, 4 * 1024**2)
    comm = allreduce_time(model.stage(2, 1), tokens, 300.0)
    assert comm > 0
    assert t2 == pytest.approx(t1 / 2 + comm)
    # pp halves the layers of a stage, and the pipeline adds the activation send.
    t_pp = model.prefill_stage_time(1, 2, 4, tokens, 4 * 1024**2)
    assert t_pp == pytest.approx(t1 / 2)
    assert LatencyModel.pipeline_latency(t_pp, 2, 1000, 100.0) == pytest.approx(2 * t_pp + 1000 / 100e9)


def test_only_shapes_profiled_as_overlapped_choose_their_next_step_a_round_ahead() -> None:
    overlapped = synthetic_shape(1, PRE, DEC).model_copy(update={"overlapped_decode": True})
    model = LatencyModel.from_profile(profile_of(overlapped, synthetic_shape(2, PRE, DEC)), A100, 300.0)
    assert model.overlaps_decode(1, 1)
    assert not model.overlaps_decode(2, 1) and not model.overlaps_decode(4, 1)  # profiled plain; derived
    assert not LatencyModel.analytic(OPT13, A100, 300.0).overlaps_decode(1, 1)
    reloaded = LatencyProfile.model_validate_json(profile_of(overlapped).model_dump_json(by_alias=True))
    assert reloaded.shapes[0].overlapped_decode


def test_profiled_shapes_are_used_as_measured() -> None:
    pre2 = (0.0134, 6.23e-5, 2.2e-9)
    profile = profile_of(synthetic_shape(1, PRE, DEC), synthetic_shape(2, pre2, DEC))
    model = LatencyModel.from_profile(profile, A100, 300.0)
    assert model.prefill_time(2, 1, [1000]) == pytest.approx(pre2[0] + pre2[1] * 1000 + pre2[2] * 1e6, rel=1e-6)
    # tp=4 is derived from the nearest profiled shape, tp=2.
    base4, _ = model.decode_coefficients(4, 1, 8)
    base2, _ = model.decode_coefficients(2, 1, 8)
    assert base4 < base2


def test_profile_errors_are_actionable() -> None:
    with pytest.raises(ProfileError, match="H100-80GB"):
        LatencyModel.from_profile(profile_of(synthetic_shape(1, PRE, DEC), gpu="A100-80GB"),
                                  GPU_PRESETS["H100-80GB"], 300.0)
    few = ShapeProfile(tp=1, pp=1, prefill=[PrefillSample(batch_size=1, sum_tokens=8, sum_sq_tokens=64, seconds=0.1)],
                       decode=synthetic_shape(1, PRE, DEC).decode)
    with pytest.raises(ProfileError, match="at least 3 samples"):
        LatencyModel.from_profile(profile_of(few), A100, 300.0)
    no_decode = ShapeProfile(tp=1, pp=1, prefill=synthetic_shape(1, PRE, DEC).prefill)
    with pytest.raises(ProfileError, match="no decode samples"):
        LatencyModel.from_profile(profile_of(no_decode), A100, 300.0)
    with pytest.raises(ProfileError, match="twice"):
        LatencyModel.from_profile(profile_of(synthetic_shape(1, PRE, DEC), synthetic_shape(1, PRE, DEC)), A100, 300.0)


def test_analytic_matches_distserve_a100_profile_of_opt13b() -> None:
    """Sanity bound on the calibration (DistServe's published fit, see analytic.py)."""
    model = LatencyModel.analytic(OPT13, A100, 300.0)
    assert model.source == "analytic"
    for n in (128, 512, 2048):
        assert model.prefill_time(1, 1, [n]) == pytest.approx(PRE[0] + PRE[1] * n + PRE[2] * n * n, rel=0.1)
    for batch in (1, 16):
        expected = DEC[0] + DEC[1] * batch + DEC[2] * batch * 700
        assert model.decode_time(1, 1, batch, batch * 700) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("preset", ["opt-13b", "opt-66b", "llama-3-8b", "llama-3-70b"])
def test_analytic_is_monotone(preset: str) -> None:
    model = LatencyModel.analytic(MODEL_PRESETS[preset], GPU_PRESETS["H100-80GB"], 450.0)
    tp = 8 if "70b" in preset or "66b" in preset else 1
    prefill = [model.prefill_time(tp, 1, [n]) for n in (1, 16, 128, 512, 2048, 8192)]
    assert all(a < b for a, b in zip(prefill, prefill[1:], strict=False))
    assert model.prefill_time(tp, 1, [512, 512]) > model.prefill_time(tp, 1, [512])
    batches = [model.decode_time(tp, 1, b, b * 500) for b in (1, 8, 64, 256, 1024)]
    assert all(a < b for a, b in zip(batches, batches[1:], strict=False))
    contexts = [model.decode_time(tp, 1, 32, s) for s in (0, 1000, 100_000)]
    assert all(a < b for a, b in zip(contexts, contexts[1:], strict=False))


def test_bigger_tp_prefills_long_prompts_faster() -> None:
    model = LatencyModel.analytic(MODEL_PRESETS["opt-66b"], A100, 300.0)
    times = [model.prefill_time(tp, 1, [2048, 2048]) for tp in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(times, times[1:], strict=False))
    # ...but communication keeps it from scaling perfectly.
    assert times[3] > times[0] / 8


def test_kv_capacity_and_fits() -> None:
    model = LatencyModel.analytic(MODEL_PRESETS["opt-175b"], A100, 300.0)
    assert model.kv_capacity_tokens(1, 1) == 0 and not model.fits(1, 1)  # 350 GB of weights on one GPU
    assert model.kv_capacity_tokens(8, 1) > 0 and model.fits(8, 1)
    opt13 = LatencyModel.analytic(OPT13, A100, 300.0)
    caps = [opt13.kv_capacity_tokens(tp, 1) for tp in (1, 2, 4)]
    assert caps[0] > 30_000 and caps[0] < caps[1] < caps[2]
    assert opt13.kv_capacity_tokens(1, 1, mem_util=0.5) < caps[0]
    # An invalid split (tp not dividing the 40 heads) does not fit, and says why when timed.
    assert opt13.kv_capacity_tokens(3, 1) == 0 and not opt13.fits(3, 1)
    with pytest.raises(ShapeError, match="does not divide"):
        opt13.prefill_time(3, 1, [10])


def test_kv_transfer_time() -> None:
    per_token = 2 * 40 * 5120 * 2  # OPT-13B fp16
    assert kv_transfer_time(OPT13, 1000, 25.0) == pytest.approx(1000 * per_token / 25e9)
    with pytest.raises(ValueError, match="positive"):
        kv_transfer_time(OPT13, 10, 0.0)


def test_pp_round_is_the_runtimes_micro_batched_step():
    from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS
    from disagg_planner.latency import LatencyModel
    from disagg_planner.simulator.rounds import RoundCost

    lat = LatencyModel.analytic(MODEL_PRESETS["opt-13b"], GPU_PRESETS["A100-80GB"], 300.0)
    cost = RoundCost(lat, 1, 2, 25.0)
    # 5 sequences on 2 stages: micro-batches of 3 and 2; the round is 3 stage-times of a 3-sequence
    # micro-batch (the first crosses both stages, the second follows one stage behind) plus one send.
    stage_base, _ = lat.decode_coefficients(1, 2, 3)
    send = 3 * lat.stage(1, 2).hidden_bytes_per_token / 25e9
    assert cost.base(5) == pytest.approx(3 * stage_base + send)
    assert cost.base(1) == pytest.approx(2 * lat.decode_coefficients(1, 2, 1)[0] + lat.stage(1, 2).hidden_bytes_per_token / 25e9)
    assert RoundCost(lat, 1, 1, None).base(5) == pytest.approx(lat.decode_coefficients(1, 1, 5)[0])
