"""The fast paths of the search give what the plain ones give: the same plan, the same simulated numbers.

The search skips goodput estimates the choice cannot use (`contenders`), fits replica counts trying the
capacity bound's count before bisecting (`bisect_counts` is bisection alone), and the simulators take traces
built from the search's arrays and build per-request result objects only on demand. Each is held to its
reference: every candidate estimated (`estimate_all`) with counts bisected (`bisect_counts`), traces built
from SimRequest objects, results built eagerly.
"""

from __future__ import annotations

import numpy as np
import pytest
from disagg_planner.api import GPU_PRESETS, MODEL_PRESETS, DisaggServingSpec, GoodputInterval, WorkloadSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.search import find_plan
from disagg_planner.search.allocate import Candidate
from disagg_planner.search.confidence import choose, contenders
from disagg_planner.search.latency_source import latency_model
from disagg_planner.search.problem import SearchProblem
from disagg_planner.search.shapes import Shape
from disagg_planner.search.system import Fitted, Layout, fit
from disagg_planner.simulator import (
    ChunkedColocatedConfig,
    ColocatedConfig,
    DisaggConfig,
    PhaseShape,
    SimResult,
    simulate_colocated,
    simulate_colocated_chunked,
    simulate_disaggregated,
)
from disagg_planner.simulator.trace import Trace
from disagg_planner.workloads import SimRequest, sample_requests
from hypothesis import given, settings
from hypothesis import strategies as st

LAT = LatencyModel.analytic(MODEL_PRESETS["opt-13b"], GPU_PRESETS["A100-80GB"], 300.0)


def _spec(model: str, nodes: int, gpus_per_node: int, rate: float, ttft: int, tpot: int, inter: str,
          mode: str = "auto") -> DisaggServingSpec:
    return DisaggServingSpec.model_validate({
        "model": {"preset": model},
        "cluster": {"nodes": nodes, "gpusPerNode": gpus_per_node, "gpuType": "A100-80GB",
                    "interNodeBandwidth": inter},
        "workload": {"rate": rate, "dataset": "chatbot"},
        "slo": {"ttftMs": ttft, "tpotMs": tpot},
        "mode": mode,
    })


@pytest.mark.parametrize("spec", [
    _spec("opt-13b", 1, 4, 4.0, 250, 100, "25GB"),  # one node: KV over NVLink
    _spec("opt-13b", 2, 8, 10.0, 250, 100, "3.125GB"),  # a slow network: low affinity tried, then high
    _spec("opt-66b", 2, 8, 10.0, 2500, 150, "25GB", mode="disaggregated"),
    _spec("opt-13b", 1, 8, 500.0, 250, 100, "25GB"),  # past what the budget serves: no candidate meets it
], ids=["13b-1x4", "13b-2x8-slow-net", "66b-2x8-disagg", "13b-1x8-unreachable"])
def test_the_search_returns_the_plan_of_its_reference_path(spec: DisaggServingSpec) -> None:
    fast = find_plan(spec, workers=1)
    reference = find_plan(spec, workers=1, estimate_all=True, bisect_counts=True)
    assert fast.model_dump() == reference.model_dump()


# -- which fitted candidates need a goodput ----------------------------------------------------------------
def _fitted(gpus: int, attainment: float) -> Fitted:
    shape = Shape(1, 1)
    cand = Candidate("colocated", "high", shape, None, gpus, 0, 1.0, 0.0, gpus, float(gpus))
    return Fitted(cand, [], None, {}, attainment, 0)


def _interval(goodput: float) -> GoodputInterval:
    return GoodputInterval(low_rps=goodput * 0.95, high_rps=goodput * 1.05, coverage=0.9, seeds=[0],
                           samples_rps=[goodput])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.sampled_from([0.5, 0.85, 0.9, 0.97]),
                          st.floats(0.5, 30.0)), min_size=1, max_size=6))
def test_choosing_among_contenders_is_choosing_among_all(rows: list[tuple[int, float, float]]) -> None:
    target, rate = 0.9, 10.0
    # A candidate meeting the target has goodput >= the rate (the estimator's anchor); others below it.
    fitted = [_fitted(g, a) for g, a, _ in rows]
    goodput = {id(f): max(v, rate) if f.meets(target) else min(v, rate * 0.99) for f, (_, _, v) in zip(fitted, rows, strict=True)}

    def pick(items: list[Fitted]) -> Fitted | None:
        return choose(items, rate, gpus=lambda f: f.candidate.gpus, goodput=lambda f: goodput[id(f)],
                      meets=lambda f: f.meets(target), interval=lambda f: _interval(goodput[id(f)]))

    kept = contenders(fitted, target, rate)
    assert pick(kept) is pick(fitted)
    if any(f.meets(target) for f in fitted):
        assert all(f.meets(target) for f in kept)
        assert len({f.candidate.gpus for f in kept}) == 1
    else:
        assert kept == fitted


# -- the simulators on traces from arrays --------------------------------------------------------------------
def _requests(seed: int, with_limits: bool) -> list[SimRequest]:
    reqs = [r.clip(LAT.model.max_context) for r in sample_requests(WorkloadSpec(rate=12.0, dataset="chatbot"), 12.0,
                                                                   600, seed)]
    if with_limits:
        reqs = [SimRequest(r.arrival, r.input_len, r.output_len, r.output_len + (i % 3)) for i, r in enumerate(reqs)]
    return reqs


def _arrays(reqs: list[SimRequest]) -> Trace:
    limits = np.array([r.max_tokens or 0 for r in reqs], dtype=np.int64)
    return Trace.of_arrays(np.array([r.arrival for r in reqs]), np.array([r.input_len for r in reqs], dtype=np.int64),
                           np.array([r.output_len for r in reqs], dtype=np.int64), limits)


@pytest.mark.parametrize("with_limits", [False, True])
def test_a_trace_from_arrays_is_the_trace_of_the_same_requests(with_limits: bool) -> None:
    reqs = _requests(1, with_limits)
    reqs = reqs[::2] + reqs[1::2]  # out of arrival order: both sort the same way
    a, b = Trace.of(reqs), _arrays(reqs)
    assert a.order.tolist() == b.order.tolist()
    assert (a.arrivals, a.inputs, a.outputs, a.limits) == (b.arrivals, b.inputs, b.outputs, b.limits)


@pytest.mark.parametrize("simulate, cfg", [
    (simulate_disaggregated, DisaggConfig(PhaseShape(1, 1, 2), PhaseShape(1, 1, 3), 25.0)),
    (simulate_disaggregated, DisaggConfig(PhaseShape(1, 2, 1), PhaseShape(2, 1, 1), 3.0)),
    (simulate_colocated, ColocatedConfig(PhaseShape(1, 1, 2))),
    (simulate_colocated_chunked, ChunkedColocatedConfig(PhaseShape(1, 1, 2), 512)),
], ids=["disagg-2p3d", "disagg-pp2", "colocated", "chunked"])
def test_simulators_give_the_same_numbers_from_requests_and_from_arrays(simulate, cfg) -> None:
    reqs = _requests(2, with_limits=True)
    a, b = simulate(cfg, LAT, reqs), simulate(cfg, LAT, _arrays(reqs))
    for x, y in ((a.ttfts, b.ttfts), (a.tpots, b.tpots), (a.e2es, b.e2es)):
        assert x.tolist() == y.tolist()
    assert (a.peak_kv_tokens, a.preemptions, a.preempted_tokens) == (b.peak_kv_tokens, b.preemptions,
                                                                     b.preempted_tokens)
    eager = SimResult(a.results, a.peak_kv_tokens, a.kv_capacity_tokens)  # objects first, arrays from them
    assert eager.ttfts.tolist() == a.ttfts.tolist() and eager.num_requests == a.num_requests == len(reqs)
    assert eager.attainment(0.25, 0.1) == a.attainment(0.25, 0.1)


# -- replica counts: the capacity bound's count first, or bisection alone -----------------------------------
@pytest.mark.parametrize("mode, replicas", [("colocated", 16), ("colocated-chunked", 16), ("disaggregated", 8)])
def test_trying_the_bound_first_keeps_a_passing_count_no_larger_than_bisection(mode: str, replicas: int) -> None:
    spec = _spec("opt-13b", 4, 8, 20.0, 250, 100, "25GB")
    problem = SearchProblem.of(spec, latency_model(spec, None), 0)
    shape = Shape(2, 1)
    if mode == "disaggregated":  # far more instances than the rate needs: both phases shrink
        cand = Candidate("disaggregated", "high", shape, shape, replicas, replicas, 2.0, 2.0, 4 * replicas,
                         2.0 * replicas)
    else:
        cand = Candidate("colocated", "high", shape, None, replicas, 0, 2.0, 0.0, 2 * replicas, 2.0 * replicas,
                         chunk_budget=2048 if mode == "colocated-chunked" else 0)
    layout = Layout(4, 8, 32)
    fast, reference = fit(problem, layout, cand), fit(problem, layout, cand, bisect=True)
    assert fast is not None and reference is not None
    assert reference.meets(problem.target) and fast.meets(problem.target)
    assert fast.candidate.n_prefill <= reference.candidate.n_prefill < replicas
    assert fast.candidate.n_decode <= reference.candidate.n_decode
    # Where attainment rises with the count (these cases), the two paths land on the same counts.
    assert (fast.candidate.n_prefill, fast.candidate.n_decode) == (reference.candidate.n_prefill,
                                                                   reference.candidate.n_decode)
    assert fast.attainment_at_target == reference.attainment_at_target
