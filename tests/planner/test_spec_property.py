"""Property: any spec the API tree accepts plans or degrades (a PlannerError) within the planning deadline,
and any document it refuses is refused with a ValidationError; no other exception escapes either step."""

from __future__ import annotations

import time

from disagg_planner.api import DisaggServingSpec
from disagg_planner.errors import PlannerError
from disagg_planner.search import find_plan
from disagg_planner.search.deadline import plan_within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

DEADLINE_S = 2.0
SLACK_S = 5.0  # the child's start and kill on a loaded 2-core machine

extreme_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 1e300, -1.0, 0.0]))


def positive(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Mostly in range (so most specs reach the search), sometimes extreme (so validation is exercised)."""
    in_range = st.floats(lo, hi)
    return st.integers(0, 9).flatmap(lambda i: extreme_floats if i == 9 else in_range)


def histogram() -> st.SearchStrategy[dict]:
    edges = st.lists(st.integers(1, 1 << 22), min_size=2, max_size=6, unique=True).map(sorted)
    return edges.flatmap(lambda e: st.fixed_dictionaries({
        "edges": st.just(e),
        "counts": st.lists(st.integers(0, 9).flatmap(lambda i: st.sampled_from([1e308, 0.0, -1.0]) if i == 9
                                                     else st.floats(0, 1e15)),
                           min_size=len(e) - 1, max_size=len(e) - 1)}))


custom_model = st.tuples(st.sampled_from([1, 2, 32]), st.sampled_from([1, 64, 128]), st.sampled_from([1, 2])).map(
    lambda t: (t[0], t[0] * t[1], t[0] // t[2] or 1)).flatmap(lambda shape: st.fixed_dictionaries({
        "name": st.text(min_size=1, max_size=8),
        "architecture": st.sampled_from(["llama", "opt"]),
        "numLayers": st.integers(1, 128), "hiddenSize": st.just(shape[1]),
        "numHeads": st.just(shape[0]), "numKvHeads": st.just(shape[2]),
        "ffnSize": st.integers(1, 1 << 19), "vocabSize": st.integers(1, 1 << 22),
        "maxContext": st.sampled_from([16, 2048, 1 << 20]),
    }))
model = st.one_of(st.fixed_dictionaries({"preset": st.sampled_from(["opt-13b", "tiny-llama", "llama-3-8b",
                                                                     "opt-175b"])}),
                  st.fixed_dictionaries({"custom": custom_model}))
cluster = st.fixed_dictionaries({
    "nodes": st.integers(1, 4096), "gpusPerNode": st.integers(1, 64),
    "gpuType": st.sampled_from(["A100-80GB", "H100-80GB", "H200-141GB", "CPU", "A100-80GB", None]),
}, optional={"interNodeGbps": positive(1e-6, 1e5), "intraNodeGbps": positive(1e-6, 1e5)})
workload = st.one_of(
    st.fixed_dictionaries({"rate": positive(1e-3, 1e6), "dataset": st.sampled_from(["chatbot", "code",
                                                                                   "summarization"])}),
    st.fixed_dictionaries({"rate": positive(1e-3, 1e6), "dataset": st.none(), "inputLengths": histogram(),
                           "outputLengths": histogram()}),
)
slo = st.fixed_dictionaries({"ttftMs": positive(1e-3, 3.6e6), "tpotMs": positive(1e-3, 6e4)},
                            optional={"attainment": st.floats(0.01, 1.0)})
search = st.fixed_dictionaries({}, optional={"maxTp": st.sampled_from([1, 2, 4, 8, 3]), "maxPp": st.integers(1, 8),
                                             "gpuBudget": st.integers(1, 1 << 16)})
specs = st.fixed_dictionaries({"model": model, "cluster": cluster, "workload": workload, "slo": slo,
                               "search": search})


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_every_spec_plans_or_degrades_within_the_deadline(doc):
    try:
        spec = DisaggServingSpec.model_validate(doc)
    except ValidationError:
        return  # refused at parse time, naming its field: the operator reports InvalidSpec
    t0 = time.monotonic()
    try:
        plan = plan_within(find_plan, spec, deadline_s=DEADLINE_S, workers=1)
    except PlannerError:
        pass  # infeasible, unmet or out of time: a condition, not a traceback
    else:
        assert plan.gpus <= spec.gpu_budget and 0 <= plan.predicted_attainment <= 1
    assert time.monotonic() - t0 < DEADLINE_S + SLACK_S
