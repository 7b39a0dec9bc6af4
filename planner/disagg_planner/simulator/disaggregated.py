"""Disaggregated serving: prefill instances feed decode instances over a KV link."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..latency import LatencyModel, kv_transfer_time
from ..workloads import SimRequest
from .decode import simulate_decode
from .kv_blocks import preemption_costs
from .prefill import simulate_prefill
from .rounds import RoundCost
from .trace import Trace, as_trace, check_fits, instance_capacity
from .types import DisaggConfig, SimResult


def simulate_disaggregated(cfg: DisaggConfig, latency: LatencyModel, requests: Sequence[SimRequest] | Trace) -> SimResult:
    """Simulate `requests` on the configuration; deterministic (no randomness inside).

    TTFT ends at prefill completion (the first token is emitted there); the KV transfer and decode
    queueing fall into the gaps before the second token, so they count in TPOT.
    """
    trace = as_trace(requests)
    prefill_cap = instance_capacity(latency, cfg.prefill, cfg.mem_util, "prefill")
    decode_cap = instance_capacity(latency, cfg.decode, cfg.mem_util, "decode")
    if not trace.inputs:
        return SimResult([], [0] * cfg.decode.instances, decode_cap)
    check_fits(trace.inputs, prefill_cap, "prefill", "its prompt")
    footprints = [i + m - 1 for i, m, o in zip(trace.inputs, trace.limits, trace.outputs, strict=True) if o > 1]
    check_fits(footprints, decode_cap // cfg.kv.block_size * cfg.kv.block_size, "decode", "prompt + max_tokens - 1")

    first = simulate_prefill(cfg.prefill, latency, cfg.prefill_token_budget, trace.arrivals, trace.inputs)
    last = first.copy()
    by_ready = np.argsort(first, kind="stable").tolist()
    to_decode = [j for j in by_ready if trace.outputs[j] > 1]
    link = cfg.decode.stage_link_gbps or latency.intra_node_gbps
    batches = simulate_decode(
        instances=cfg.decode.instances,
        capacity=decode_cap,
        cost=RoundCost(latency, cfg.decode.tp, cfg.decode.pp, cfg.decode.stage_link_gbps),
        transfer_seconds_per_token=kv_transfer_time(latency.model, 1, cfg.kv_link_gbps),
        ready=first + latency.kv_handoff_s,  # the served path's fixed hand-off cost delays each pull's start
        order=to_decode,
        inputs=trace.inputs,
        outputs=trace.outputs,
        finish=last,
        policy=cfg.kv,
        costs=preemption_costs(latency, cfg.decode.tp, cfg.decode.pp, link, cfg.kv),
        overlapped=latency.overlaps_decode(cfg.decode.tp, cfg.decode.pp),
    )
    peaks = [b.ledger.peak * b.ledger.bs for b in batches]
    return trace.result(first, last, peaks, decode_cap, preemptions=sum(b.preemptions for b in batches),
                        preempted_tokens=sum(b.preempted_tokens for b in batches),
                        request_latency_s=latency.request_latency_s)
