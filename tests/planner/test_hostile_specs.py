"""Hostile specs: validation at parse time naming the field, a search bounded by its deadline and
cancellable, extremes that plan in bounded time, and shortfalls reported with their numbers and cause."""

from __future__ import annotations

import threading
import time

import pytest
from disagg_planner.api import DisaggServingSpec
from disagg_planner.errors import NoFeasiblePlan, PlannerError, PlanningCancelled, PlanningTimeout
from disagg_planner.search import find_plan
from disagg_planner.search.deadline import plan_within
from disagg_planner.search.shortfall import shortfall
from pydantic import ValidationError

BASE = {"model": {"preset": "opt-13b"}, "cluster": {"nodes": 1, "gpusPerNode": 4},
        "workload": {"rate": 2, "dataset": "chatbot"}, "slo": {"ttftMs": 250, "tpotMs": 100}}
HIST = {"edges": [1, 100], "counts": [1]}


def spec(**parts) -> dict:
    out = {k: dict(v) for k, v in BASE.items()}
    for key, value in parts.items():
        out[key] = value if not isinstance(value, dict) else {**out.get(key, {}), **value}
    return out


def refused(doc: dict) -> str:
    with pytest.raises(ValidationError) as exc:
        DisaggServingSpec.model_validate(doc)
    first = exc.value.errors()[0]
    return ".".join(str(p) for p in first["loc"]) + ": " + first["msg"]


@pytest.mark.parametrize("doc,where", [
    (spec(cluster={"gpuType": None}), "cluster.gpuType"),
    (spec(workload={"rate": 1e-300}), "workload.rate"),
    (spec(workload={"rate": 0}), "workload.rate"),
    (spec(workload={"rate": float("nan")}), "workload.rate"),
    (spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 2, 3], "counts": [1e308, 1e308]},
                    "outputLengths": HIST}), "workload.inputLengths.counts"),
    (spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 2], "counts": [float("inf")]},
                    "outputLengths": HIST}), "workload.inputLengths.counts"),
    (spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 2], "counts": [1e14]},
                    "outputLengths": {"edges": [1, 2], "counts": [1e15, ]}}), None),
    (spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 1 << 40], "counts": [1]},
                    "outputLengths": HIST}), "workload.inputLengths.edges"),
    (spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1000, 4000], "counts": [1]},
                    "outputLengths": HIST}), "workload.inputLengths"),
    (spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 2000, 2100], "counts": [1, 1]},
                    "outputLengths": {"edges": [64, 65], "counts": [1]}}), "workload.inputLengths"),
])
def test_specs_the_planner_cannot_use_are_refused_naming_the_field(doc, where):
    if where is None:
        DisaggServingSpec.model_validate(doc)  # large but finite counts are fine
        return
    assert where in refused(doc)


def test_lengths_within_the_context_and_zero_count_bins_beyond_it_are_accepted():
    doc = spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 1000, 9000], "counts": [5, 0]},
                         "outputLengths": {"edges": [1, 1000], "counts": [1]}})
    parsed = DisaggServingSpec.model_validate(doc)
    assert parsed.workload.input_lengths.max_served == 999


def test_a_gpu_given_explicitly_needs_no_gpu_type():
    gpu = {"name": "X1", "memoryGib": 80, "peakTflops": 300, "hbmGbps": 2000}
    assert DisaggServingSpec.model_validate(spec(cluster={"gpuType": None, "gpu": gpu})).cluster.gpu_spec.name == "X1"


def _sleepy_plan(spec, profile, **_):
    time.sleep(600)


def _broken_plan(spec, profile, **_):
    return {}["missing"]


def _infeasible_plan(spec, profile, **_):
    raise NoFeasiblePlan("budget too small")


def test_the_deadline_stops_a_search_that_would_run_on():
    t0 = time.monotonic()
    with pytest.raises(PlanningTimeout) as exc:
        plan_within(_sleepy_plan, DisaggServingSpec.model_validate(BASE), deadline_s=1.0)
    assert time.monotonic() - t0 < 10 and exc.value.deadline_s == 1.0 and "1s deadline" in str(exc.value)


def test_cancel_stops_the_search():
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(PlanningCancelled):
        plan_within(_sleepy_plan, DisaggServingSpec.model_validate(BASE), deadline_s=300, cancel=cancel)
    assert time.monotonic() - t0 < 10


def test_planner_errors_cross_the_process_boundary_and_crashes_become_planner_errors():
    doc = DisaggServingSpec.model_validate(BASE)
    with pytest.raises(NoFeasiblePlan) as exc:
        plan_within(_infeasible_plan, doc, deadline_s=30)
    assert exc.value.reason == "budget too small"
    with pytest.raises(PlannerError, match="KeyError"):
        plan_within(_broken_plan, doc, deadline_s=30)


DEGENERATE = {"name": "d", "architecture": "llama", "numLayers": 1, "hiddenSize": 1, "numHeads": 1,
              "numKvHeads": 1, "ffnSize": 1, "vocabSize": 1, "maxContext": 16}
TINY = {"edges": [1, 4], "counts": [1]}


@pytest.mark.parametrize("doc", [
    spec(workload={"rate": 1e-3, "dataset": "chatbot"}),
    spec(model={"custom": DEGENERATE, "preset": None},
         workload={"rate": 2, "dataset": None, "inputLengths": TINY, "outputLengths": TINY}),
    spec(model={"custom": DEGENERATE, "preset": None}, cluster={"nodes": 3, "gpusPerNode": 1},
         workload={"rate": 1e6, "dataset": None, "inputLengths": TINY, "outputLengths": TINY}),
], ids=["rate-1e-3", "every-dimension-1", "degenerate-at-1e6-rps"])
def test_extreme_but_valid_specs_plan_or_degrade_within_the_deadline(doc):
    parsed = DisaggServingSpec.model_validate(doc)
    t0 = time.monotonic()
    try:
        plan = plan_within(find_plan, parsed, deadline_s=60, workers=1)
        assert plan.gpus >= (2 if plan.mode == "disaggregated" else 1)
    except PlannerError:
        pass
    assert time.monotonic() - t0 < 70


def test_a_huge_cluster_at_a_huge_rate_degrades_at_the_deadline():
    parsed = DisaggServingSpec.model_validate(spec(cluster={"nodes": 4096, "gpusPerNode": 64},
                                                   workload={"rate": 1e6, "dataset": "chatbot"}))
    t0 = time.monotonic()
    with pytest.raises(PlannerError):
        plan_within(find_plan, parsed, deadline_s=3, workers=1)
    assert time.monotonic() - t0 < 15


def test_an_unmet_target_is_a_shortfall_with_the_numbers():
    parsed = DisaggServingSpec.model_validate(spec(workload={"rate": 1000, "dataset": "chatbot"}))
    plan = find_plan(parsed, workers=1)
    short = shortfall(plan, parsed)
    assert short is not None and short.target_rate_rps == 1000 and short.target_attainment == 0.9
    assert short.predicted_attainment == plan.predicted_attainment < 0.9 and short.goodput_rps == plan.goodput_rps
    assert "1e+03 req/s" in short.message() and f"{plan.goodput_rps:.3g}" in short.message()
    met = DisaggServingSpec.model_validate(BASE)
    assert shortfall(find_plan(met, workers=1), met) is None


def test_a_link_far_too_slow_is_blamed_rather_than_the_slos_or_the_budget():
    # Disaggregated: a colocated plan moves no KV, so `auto` would serve on one GPU without the link.
    parsed = DisaggServingSpec.model_validate(spec(cluster={"nodes": 2, "gpusPerNode": 1, "interNodeGbps": 0.01},
                                                   mode="disaggregated"))
    for affinity in (None, "high"):
        with pytest.raises(NoFeasiblePlan) as exc:
            find_plan(parsed, workers=1, affinity=affinity)
        assert "interNodeBandwidth=0.01GB" in str(exc.value) and "link is the bottleneck" in str(exc.value)


def test_find_plan_takes_a_deadline_itself():
    parsed = DisaggServingSpec.model_validate(spec(cluster={"nodes": 4096, "gpusPerNode": 64},
                                                   workload={"rate": 1e6, "dataset": "chatbot"}))
    t0 = time.monotonic()
    with pytest.raises(PlanningTimeout):
        find_plan(parsed, workers=1, deadline_s=1.5)
    assert time.monotonic() - t0 < 15
    small = DisaggServingSpec.model_validate(BASE)
    assert find_plan(small, workers=1, deadline_s=60) == find_plan(small, workers=1)


def test_explicit_prompts_longer_than_max_prompt_tokens_are_refused():
    doc = spec(workload={"rate": 2, "dataset": None, "inputLengths": {"edges": [1, 900], "counts": [1]},
                         "outputLengths": HIST}, runtime={"maxPromptTokens": 512})
    assert "runtime.maxPromptTokens" in refused(doc)
