"""The serving-mode choice: every bundled example deploys its best mode, an explicit mode is obeyed, ties and
misses are decided by the documented rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from disagg_planner.api import DisaggServingSpec
from disagg_planner.errors import NoFeasiblePlan
from disagg_planner.search import find_plan, modes
from disagg_planner.search.allocate import Candidate
from disagg_planner.search.shapes import Shape
from disagg_planner.search.system import Measured

REPO = Path(__file__).resolve().parents[2]


def _example_specs() -> list[tuple[str, DisaggServingSpec]]:
    """Every spec under examples/ (flat or reorganised into subfolders): DisaggServing manifests and bare specs;
    other documents (Helm values, Argo CD applications) are skipped."""
    out = []
    for path in sorted((REPO / "examples").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            body = doc.get("spec") if doc.get("kind") == "DisaggServing" else doc
            if isinstance(body, dict) and {"model", "cluster", "workload", "slo"} <= set(body):
                out.append((str(path.relative_to(REPO)), DisaggServingSpec.model_validate(body)))
    return out


EXAMPLES = _example_specs()


def test_there_are_examples_to_check():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize(("name", "spec"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_every_example_deploys_the_best_mode_that_meets_its_target(name, spec):
    plan = find_plan(spec.model_copy(update={"mode": "auto"}), workers=2)
    alts = {a.mode: a for a in plan.alternatives}
    assert set(alts) == {"disaggregated", "colocated", "colocated-chunked"}
    chosen = alts[plan.serving_mode]
    assert chosen.per_gpu_goodput == pytest.approx(plan.per_gpu_goodput)
    assert chosen.gpus == plan.gpus
    meeting = [a for a in alts.values() if a.meets_target]
    if meeting:
        assert chosen.meets_target
    for alt in meeting:
        assert plan.per_gpu_goodput >= alt.per_gpu_goodput, (name, alt)
    assert plan.choice.startswith(f"{plan.serving_mode}:")
    if plan.mode == "colocated":
        assert plan.colocated is not None and plan.colocated_prefill in ("priority", "chunked")
        assert (plan.chunk_token_budget is not None) == (plan.colocated_prefill == "chunked")


CHATBOT = {
    "model": {"preset": "opt-13b"},
    "cluster": {"nodes": 1, "gpusPerNode": 4},
    "workload": {"rate": 4.0, "dataset": "chatbot"},
    "slo": {"ttftMs": 250, "tpotMs": 100},
}


@pytest.fixture(scope="module")
def auto_plan():
    return find_plan(DisaggServingSpec.model_validate(CHATBOT), workers=1)


def test_mode_defaults_to_auto_and_is_part_of_the_planning_hash():
    spec = DisaggServingSpec.model_validate(CHATBOT)
    assert spec.mode == "auto"
    hashes = {DisaggServingSpec.model_validate({**CHATBOT, "mode": m}).planning_hash()
              for m in ("auto", "disaggregated", "colocated")}
    assert len(hashes) == 3
    with pytest.raises(ValueError, match="mode"):
        DisaggServingSpec.model_validate({**CHATBOT, "mode": "chunked"})


def test_explicit_disaggregated_is_obeyed_even_where_colocation_serves_more(auto_plan):
    assert auto_plan.mode == "colocated"  # on this spec colocation wins per GPU (see the alternatives)
    plan = find_plan(DisaggServingSpec.model_validate({**CHATBOT, "mode": "disaggregated"}), workers=1)
    assert plan.mode == "disaggregated" and plan.prefill and plan.decode
    assert [a.mode for a in plan.alternatives] == ["disaggregated", "colocated"]
    colocated = plan.alternatives[1]
    assert plan.colocated_per_gpu_goodput == pytest.approx(colocated.per_gpu_goodput)
    assert plan.gain_over_colocated == pytest.approx(plan.per_gpu_goodput / colocated.per_gpu_goodput)


def test_explicit_colocated_takes_the_better_colocated_scheduler(auto_plan):
    plan = find_plan(DisaggServingSpec.model_validate({**CHATBOT, "mode": "colocated"}), workers=1)
    assert plan.mode == "colocated" and plan.prefill is None and plan.decode is None
    assert {a.mode for a in plan.alternatives} == {"colocated", "colocated-chunked"}
    best = max((a for a in plan.alternatives if a.meets_target), key=lambda a: a.per_gpu_goodput)
    assert plan.serving_mode == best.mode
    assert {p.phase for p in plan.placement} == {"colocated"}


def test_a_tpot_bound_long_prompt_workload_picks_chunked_prefill():
    spec = DisaggServingSpec.model_validate({
        "model": {"preset": "opt-13b"}, "cluster": {"nodes": 1, "gpusPerNode": 4},
        "workload": {"rate": 1.5, "dataset": "summarization"}, "slo": {"ttftMs": 15000, "tpotMs": 150},
        "mode": "colocated",
    })
    plan = find_plan(spec, workers=2)
    alts = {a.mode: a for a in plan.alternatives}
    assert alts["colocated-chunked"].per_gpu_goodput > alts["colocated"].per_gpu_goodput
    assert plan.colocated_prefill == "chunked" and plan.chunk_token_budget in (512, 2048)
    assert alts["colocated-chunked"].chunk_token_budget == plan.chunk_token_budget


# -- the rule itself, on hand-made outcomes ------------------------------------------------------------------
def _outcome(mode: str, gpus: int, goodput: float, attainment: float = 0.95) -> modes.ModeOutcome:
    shape = Shape(1, 1)
    cand = Candidate("colocated" if mode != "disaggregated" else "disaggregated", "high", shape,
                     None if mode != "disaggregated" else shape, gpus, 0, goodput / gpus, 0.0, gpus, goodput,
                     chunk_budget=512 if mode == "colocated-chunked" else 0)
    return modes.ModeOutcome(mode, Measured(cand, [], None, goodput, goodput, attainment, 1))  # config unused here


def test_highest_per_gpu_among_those_meeting_the_target_wins():
    outcomes = [_outcome("disaggregated", 4, 12.0), _outcome("colocated", 2, 7.0),
                _outcome("colocated-chunked", 1, 5.0, attainment=0.5)]  # best per GPU but misses the target
    assert modes.choose(outcomes, "auto", 0.9, 6.0).mode == "colocated"


def test_a_tie_goes_to_fewer_gpus():
    outcomes = [_outcome("disaggregated", 4, 12.0), _outcome("colocated", 2, 6.0)]
    assert modes.choose(outcomes, "auto", 0.9, 5.0).mode == "colocated"


def test_without_a_mode_meeting_the_target_the_one_serving_most_of_it_is_deployed():
    outcomes = [_outcome("disaggregated", 4, 5.0, 0.2), _outcome("colocated", 2, 3.0, 0.1),
                modes.ModeOutcome("colocated-chunked", None, "too slow")]
    chosen = modes.choose(outcomes, "auto", 0.9, 6.0)
    assert chosen.mode == "disaggregated"
    problem = type("P", (), {"target": 0.9, "target_rate": 6.0})()
    line = modes.explain(chosen, outcomes, problem)
    assert "no mode meets 6 req/s" in line and "colocated-chunked infeasible" in line
    alt = outcomes[2].alternative(0.9)
    assert alt.gpus == 0 and not alt.meets_target and alt.note == "too slow"


def test_no_deployable_mode_names_every_reason():
    outcomes = [modes.ModeOutcome("colocated", None, "no memory"), modes.ModeOutcome("colocated-chunked", None, "")]
    with pytest.raises(NoFeasiblePlan, match="colocated: no memory; colocated-chunked: no goodput"):
        modes.choose(outcomes, "colocated", 0.9, 1.0)
    with pytest.raises(NoFeasiblePlan, match="needs two"):
        modes.choose([modes.ModeOutcome("disaggregated", None, "needs two"), _outcome("colocated", 1, 3.0)],
                     "disaggregated", 0.9, 1.0)
