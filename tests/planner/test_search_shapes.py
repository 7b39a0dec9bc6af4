"""The search space: every tp the model's heads divide (not only powers of two), every pp up to the layers."""

import pytest
from disagg_planner.api import MODEL_PRESETS, DisaggServingSpec
from disagg_planner.api.slo import SearchBounds
from disagg_planner.latency.shape import ShapeError, check_shape, tensor_parallel_degrees
from disagg_planner.search import find_plan, latency_model
from disagg_planner.search.shapes import Shape, instance_shapes


def test_tp_degrees_follow_heads_kv_heads_and_mlp():
    assert tensor_parallel_degrees(MODEL_PRESETS["opt-66b"], 8) == [1, 2, 3, 4, 6, 8]  # 72 heads
    assert tensor_parallel_degrees(MODEL_PRESETS["opt-175b"], 8) == [1, 2, 3, 4, 6, 8]  # 96 heads
    # Llama-3-8B: 32 heads but 8 KV heads, which the engine splits whole (no replication): tp <= 8.
    assert tensor_parallel_degrees(MODEL_PRESETS["llama-3-8b"], 16) == [1, 2, 4, 8]
    with pytest.raises(ShapeError, match="72 attention heads"):
        check_shape(MODEL_PRESETS["opt-66b"], 5, 1)
    check_shape(MODEL_PRESETS["opt-66b"], 3, 7)  # uneven pipeline stages are fine


def test_search_space_holds_tp3_shapes_for_opt_66b():
    spec = DisaggServingSpec.model_validate({
        "model": {"preset": "opt-66b"}, "cluster": {"nodes": 2, "gpusPerNode": 8},
        "workload": {"rate": 2.0, "dataset": "chatbot"}, "slo": {"ttftMs": 2500, "tpotMs": 150}})
    lat = latency_model(spec, None)
    shapes = instance_shapes(lat, SearchBounds(max_pp=3), 8, 16, lat.model.num_layers)
    assert {Shape(3, 1), Shape(3, 2), Shape(6, 1)} <= set(shapes)
    assert not any(s.tp in (5, 7) for s in shapes)


def test_planner_picks_tp3_when_only_three_way_shards_fit():
    # 60 GiB GPUs: OPT-66B's 132 GB of weights need three GPUs per instance; six GPUs hold two of them.
    spec = DisaggServingSpec.model_validate({
        "model": {"preset": "opt-66b"},
        "cluster": {"nodes": 1, "gpusPerNode": 6,
                    "gpu": {"name": "G60", "memoryGib": 60, "peakTflops": 312, "hbmGbps": 2039}},
        "workload": {"rate": 0.5, "dataset": "chatbot"}, "slo": {"ttftMs": 4000, "tpotMs": 300},
        "search": {"maxPp": 1}, "mode": "disaggregated"})  # about disaggregated shapes: auto could colocate
    plan = find_plan(spec, workers=1)
    assert (plan.prefill.tp, plan.decode.tp) == (3, 3)
    assert plan.gpus == 6
