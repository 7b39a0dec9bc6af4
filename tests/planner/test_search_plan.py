"""The placement search end to end on small clusters: determinism, budget monotonicity, infeasible problems."""

import pytest
from disagg_planner.api import DisaggServingSpec
from disagg_planner.errors import NoFeasiblePlan, PlannerError
from disagg_planner.search import choose_affinity, find_colocated_plan, find_plan, latency_model
from disagg_planner.search.problem import SearchProblem


def _spec(**over) -> DisaggServingSpec:
    base = {
        "model": {"preset": "opt-13b"},
        "cluster": {"nodes": 1, "gpusPerNode": 4},
        "workload": {"rate": 4.0, "dataset": "chatbot"},
        "slo": {"ttftMs": 250, "tpotMs": 100},
        "mode": "disaggregated",  # these tests are about the disaggregated search; tests/planner/test_search_modes.py
    }
    base.update(over)
    return DisaggServingSpec.model_validate(base)


@pytest.fixture(scope="module")
def small_plan():
    return find_plan(_spec(), workers=1)


def test_plan_is_consistent_with_its_placement(small_plan):
    plan = small_plan
    assert plan.mode == "disaggregated" and plan.prefill and plan.decode
    assert plan.gpus == plan.prefill.gpus + plan.decode.gpus <= 4
    used = [(p.node, g) for p in plan.placement for g in p.gpus]
    assert len(used) == len(set(used)) == plan.gpus
    for phase in (plan.prefill, plan.decode):
        assert phase.instance_goodput_rps > 0
    assert len(plan.placement) == plan.prefill.replicas * plan.prefill.pp + plan.decode.replicas * plan.decode.pp
    assert plan.goodput_rps >= plan.target_rate_rps * 0.97  # the budget allows the target
    assert plan.predicted_attainment >= 0.9
    assert plan.per_gpu_goodput == pytest.approx(plan.goodput_rps / plan.gpus)
    assert plan.gain_over_colocated == pytest.approx(plan.per_gpu_goodput / plan.colocated_per_gpu_goodput)
    assert plan.spec_hash == _spec().planning_hash()
    assert plan.latency_source == "analytic"


def test_same_seed_same_plan_whatever_the_worker_count(small_plan):
    again = find_plan(_spec(), workers=2)
    assert again.model_dump() == small_plan.model_dump()


def test_another_seed_is_another_sample_but_a_close_answer(small_plan):
    other = find_plan(_spec(), workers=1, seed=7)
    assert other.goodput_rps == pytest.approx(small_plan.goodput_rps, rel=0.25)


def test_a_bigger_budget_never_yields_lower_goodput():
    # A rate no budget here reaches, so every budget buys as much goodput as it can.
    goodputs = []
    for budget in (2, 4, 8):
        spec = _spec(cluster={"nodes": 1, "gpusPerNode": 8}, workload={"rate": 500.0, "dataset": "chatbot"},
                     search={"gpuBudget": budget})
        plan = find_plan(spec, workers=2)
        assert plan.gpus <= budget
        goodputs.append(plan.goodput_rps)
    assert goodputs == sorted(goodputs)
    assert goodputs[-1] > goodputs[0]


def test_colocated_plan_is_the_baseline_find_plan_reports(small_plan):
    colo = find_colocated_plan(_spec(), workers=1)
    assert colo.mode == "colocated" and colo.colocated is not None and colo.prefill is None
    assert colo.per_gpu_goodput == pytest.approx(small_plan.colocated_per_gpu_goodput)
    assert {p.phase for p in colo.placement} == {"colocated"}


def test_model_that_does_not_fit_the_budget_is_infeasible():
    spec = _spec(model={"preset": "opt-175b"}, cluster={"nodes": 1, "gpusPerNode": 8}, search={"gpuBudget": 2})
    with pytest.raises(NoFeasiblePlan) as info:
        find_plan(spec, workers=1)
    message = str(info.value)
    assert message.startswith("no feasible plan: ")
    assert "opt-175b" in message and "GPU budget of 2" in message
    assert info.value.reason in message


def test_disaggregation_needs_room_for_two_instances():
    spec = _spec(model={"preset": "opt-66b"}, search={"gpuBudget": 3})
    with pytest.raises(NoFeasiblePlan, match="needs a prefill and a decode instance, 2 x 2 GPUs"):
        find_plan(spec, workers=1)


def test_ttft_slo_below_the_unloaded_latency_is_infeasible():
    with pytest.raises(NoFeasiblePlan, match=r"TTFT SLO of 5 ms is below the unloaded latency.*prefill"):
        find_plan(_spec(slo={"ttftMs": 5, "tpotMs": 100}), workers=1)


def test_tpot_slo_below_the_unloaded_latency_is_infeasible():
    with pytest.raises(NoFeasiblePlan, match=r"TPOT SLO of 2 ms is below the unloaded latency.*decode step"):
        find_plan(_spec(slo={"ttftMs": 1000, "tpotMs": 2}), workers=1)


def test_a_profile_of_another_model_is_refused():
    from disagg_planner.api import MODEL_PRESETS, LatencyProfile, ShapeProfile
    from disagg_planner.api.profile import DecodeSample, PrefillSample

    profile = LatencyProfile(
        model=MODEL_PRESETS["llama-3-8b"], gpu="A100-80GB",
        shapes=[ShapeProfile(prefill=[PrefillSample(batch_size=1, sum_tokens=n, sum_sq_tokens=n * n, seconds=n * 1e-4)
                                      for n in (64, 256, 1024)],
                             decode=[DecodeSample(batch_size=b, sum_context=b * 100, seconds=0.01 + b * 1e-4)
                                     for b in (1, 8, 32)])],
    )
    with pytest.raises(PlannerError, match="differs from the spec's model"):
        latency_model(_spec(), profile)


@pytest.mark.parametrize(("inter", "expected"), [("800Gbit", "high"), ("25Gbit", "low")])
def test_affinity_follows_the_network(inter, expected):
    spec = _spec(model={"preset": "opt-66b"}, cluster={"nodes": 4, "gpusPerNode": 8, "interNodeBandwidth": inter},
                 slo={"ttftMs": 2500, "tpotMs": 150})
    problem = SearchProblem.of(spec, latency_model(spec, None), seed=0)
    choice = choose_affinity(problem, nodes=4)
    assert choice.affinity == expected
    assert expected in choice.explain()


def test_low_affinity_plan_pairs_stages_on_nodes():
    spec = _spec(model={"preset": "opt-66b"}, cluster={"nodes": 2, "gpusPerNode": 8, "interNodeBandwidth": "25Gbit"},
                 workload={"rate": 2.0, "dataset": "chatbot"}, slo={"ttftMs": 2500, "tpotMs": 150},
                 search={"maxPp": 2})
    plan = find_plan(spec, workers=2)
    assert plan.affinity == "low"
    assert plan.prefill.pp == plan.decode.pp and plan.prefill.replicas == plan.decode.replicas
    for p in plan.placement:
        if p.phase == "prefill":
            twin = [d for d in plan.placement if d.phase == "decode" and d.instance == p.instance and d.stage == p.stage]
            assert twin and twin[0].node == p.node


def test_a_profile_of_the_spec_model_drives_the_latency_model():
    from disagg_planner.api import MODEL_PRESETS, LatencyProfile, ShapeProfile
    from disagg_planner.api.profile import DecodeSample, PrefillSample

    samples = ShapeProfile(
        prefill=[PrefillSample(batch_size=1, sum_tokens=n, sum_sq_tokens=n * n, seconds=0.02 + n * 1e-4)
                 for n in (64, 256, 1024)],
        decode=[DecodeSample(batch_size=b, sum_context=b * 100, seconds=0.02 + b * 1e-4) for b in (1, 8, 32)],
    )
    profile = LatencyProfile(model=MODEL_PRESETS["opt-13b"], gpu="A100-80GB", shapes=[samples])
    model = latency_model(_spec(), profile)
    assert model.source == "profile"
    assert model.prefill_time(1, 1, [256]) == pytest.approx(0.02 + 256e-4, rel=1e-3)
