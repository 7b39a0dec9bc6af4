"""The spec tree: presets resolve, bad input names the field, the planning hash ignores rollout settings."""

import pytest
from disagg_planner.api import MODEL_PRESETS, DisaggServingSpec, LatencyProfile, ShapeProfile
from disagg_planner.api.profile import DecodeSample, PrefillSample
from pydantic import ValidationError


def _spec(**over):
    base = {
        "model": {"preset": "opt-13b"},
        "cluster": {"nodes": 2, "gpusPerNode": 8},
        "workload": {"rate": 2.0, "dataset": "chatbot"},
        "slo": {"ttftMs": 250, "tpotMs": 100},
    }
    base.update(over)
    return base


def _error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_camel_and_snake_case_both_accepted():
    a = DisaggServingSpec.model_validate(_spec())
    b = DisaggServingSpec.model_validate(_spec(cluster={"nodes": 2, "gpus_per_node": 8}))
    assert a == b
    assert a.to_wire()["cluster"]["gpusPerNode"] == 8


def test_preset_resolves_to_known_shape():
    spec = DisaggServingSpec.model_validate(_spec())
    assert spec.model.spec == MODEL_PRESETS["opt-13b"]
    # OPT-13B is 12.9B parameters with the embedding; fp16 → ~25.7 GB of weights.
    assert 12.5e9 < spec.model.spec.num_params < 13.2e9
    assert MODEL_PRESETS["llama-3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


@pytest.mark.parametrize(
    ("override", "loc", "fragment"),
    [
        ({"slo": {"ttftMs": -1, "tpotMs": 100}}, "slo.ttftMs", "greater than 0"),
        ({"search": {"maxTp": 0}}, "search.maxTp", "greater than or equal to 1"),
        ({"cluster": {"nodes": 2, "gpusPerNode": "eight"}}, "cluster.gpusPerNode", "integer"),
        ({"model": {"preset": "opt-13b", "colour": "blue"}}, "model.colour", "Extra inputs"),
        ({"model": {}}, "model", "exactly one of model.preset or model.custom"),
    ],
)
def test_malformed_spec_names_field_and_reason(override, loc, fragment):
    with pytest.raises(ValidationError) as info:
        DisaggServingSpec.model_validate(_spec(**override))
    assert loc in _error_locs(info.value)
    assert fragment in str(info.value)


def test_budget_larger_than_cluster_is_rejected():
    with pytest.raises(ValidationError, match="exceeds the cluster's 16 GPUs"):
        DisaggServingSpec.model_validate(_spec(search={"gpuBudget": 32}))


def test_histogram_must_be_consistent():
    bad = {"rate": 1, "inputLengths": {"edges": [1, 10, 5], "counts": [1, 1]}, "outputLengths": {"edges": [1, 2], "counts": [1]}}
    with pytest.raises(ValidationError, match="strictly increasing"):
        DisaggServingSpec.model_validate(_spec(workload=bad))


def test_planning_hash_ignores_rollout_settings_but_not_slo():
    a = DisaggServingSpec.model_validate(_spec())
    b = DisaggServingSpec.model_validate(_spec(runtime={"image": "other:1"}, paused=True))
    c = DisaggServingSpec.model_validate(_spec(slo={"ttftMs": 300, "tpotMs": 100}))
    assert a.planning_hash() == b.planning_hash()
    assert a.planning_hash() != c.planning_hash()


def test_profile_round_trips(tmp_path):
    profile = LatencyProfile(
        model=MODEL_PRESETS["tiny-llama"], gpu="CPU",
        shapes=[ShapeProfile(prefill=[PrefillSample(batch_size=1, sum_tokens=8, sum_sq_tokens=64, seconds=0.01)],
                             decode=[DecodeSample(batch_size=2, sum_context=16, seconds=0.002)])],
    )
    path = tmp_path / "p.json"
    profile.save(path)
    assert LatencyProfile.load(path) == profile
