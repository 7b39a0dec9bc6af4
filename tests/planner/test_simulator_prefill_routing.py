"""Prefill routing by heaps gives exactly what scanning every instance per arrival gives."""

from collections import deque

import numpy as np
from disagg_planner.api import DisaggServingSpec
from disagg_planner.latency import LatencyModel
from disagg_planner.search.latency_source import latency_model
from disagg_planner.simulator.prefill import simulate_prefill
from disagg_planner.simulator.types import PhaseShape
from hypothesis import given, settings
from hypothesis import strategies as st


def _by_scanning(shape, latency, budget, arrivals, inputs):
    """The definition: before each arrival, advance every instance; queue on the least-loaded one."""
    tp, pp = shape.tp, shape.pp
    send_per_token = latency.stage(tp, pp).hidden_bytes_per_token / (latency.intra_node_gbps * 1e9)
    done = np.empty(len(arrivals))
    insts = [{"queue": deque(), "tokens": 0, "stages": [0.0] * pp} for _ in range(shape.instances)]

    def advance(inst, before):
        queue, stages = inst["queue"], inst["stages"]
        while queue:
            start = max(stages[0], arrivals[queue[0]])
            if start >= before:
                return
            members = [queue.popleft()]
            tokens = inputs[members[0]]
            while queue and arrivals[queue[0]] <= start and tokens + inputs[queue[0]] <= budget:
                members.append(queue.popleft())
                tokens += inputs[members[-1]]
            inst["tokens"] -= tokens
            sum_sq = sum(inputs[j] ** 2 for j in members)
            if pp == 1:
                finish = start + latency.prefill_stage_time(tp, pp, len(members), tokens, sum_sq)
            else:  # micro-batches through the stages, as the runtime runs a pipelined prefill
                parts = LatencyModel.micro_batches(pp, len(members))
                t = latency.prefill_stage_time(tp, pp, -(-len(members) // parts), -(-tokens // parts),
                                               -(-sum_sq // parts))
                finish = start + (parts + pp - 1) * t + (pp - 1) * (tokens / parts) * send_per_token
            stages[:] = [finish] * pp
            for j in members:
                done[j] = finish

    for i, t in enumerate(arrivals):
        for inst in insts:
            advance(inst, t)
        target = min(insts, key=lambda p: (p["tokens"], p["stages"][0]))
        target["queue"].append(i)
        target["tokens"] += inputs[i]
    for inst in insts:
        advance(inst, float("inf"))
    return done


_SPEC = DisaggServingSpec.model_validate({
    "model": {"preset": "opt-13b"}, "cluster": {"nodes": 1, "gpusPerNode": 8},
    "workload": {"rate": 5, "dataset": "chatbot"}, "slo": {"ttftMs": 250, "tpotMs": 100}})
_LATENCY = latency_model(_SPEC, None)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(instances=st.integers(2, 12), pp=st.sampled_from([1, 2, 4]), rate=st.floats(1, 300),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=300), lengths=st.data(), rounded=st.booleans())
def test_heap_routing_matches_scanning_every_instance(instances, pp, rate, gaps, lengths, rounded):
    arrivals = np.cumsum(np.array(gaps) / rate).tolist()
    if rounded:  # many equal arrival and free times: the tie-breaks must match too
        arrivals = [round(a, 1) for a in arrivals]
    inputs = lengths.draw(st.lists(st.integers(1, 5000), min_size=len(arrivals), max_size=len(arrivals)))
    shape = PhaseShape(1, pp, instances)
    assert np.array_equal(simulate_prefill(shape, _LATENCY, 4096, arrivals, inputs),
                          _by_scanning(shape, _LATENCY, 4096, arrivals, inputs))
