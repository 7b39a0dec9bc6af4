"""A request trace as plain lists in arrival order, plus the memory checks every simulation needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..latency import LatencyModel
from ..workloads import SimRequest
from .types import ModelDoesNotFitError, PhaseShape, RequestTooLargeError, SimResult, SimulationError


@dataclass
class Trace:
    """Requests sorted by arrival; `order[k]` is the caller's index of the k-th arrival.

    `limits` are the requests' max_tokens (their output length when the workload does not give one):
    what an engine checks a request against, since it cannot know the output length.
    """

    order: np.ndarray
    arrivals: list[float]
    inputs: list[int]
    outputs: list[int]
    limits: list[int]

    @classmethod
    def of(cls, requests: Sequence[SimRequest]) -> Trace:
        arrival = np.fromiter((r.arrival for r in requests), dtype=float, count=len(requests))
        order = np.argsort(arrival, kind="stable")
        inputs = [requests[i].input_len for i in order.tolist()]
        outputs = [requests[i].output_len for i in order.tolist()]
        if inputs and (min(inputs) < 1 or min(outputs) < 1):
            raise SimulationError("every request needs input_len >= 1 and output_len >= 1")
        limits = [requests[i].max_tokens or requests[i].output_len for i in order.tolist()]
        if any(m < o for m, o in zip(limits, outputs, strict=True)):
            raise SimulationError("a request's output_len exceeds its max_tokens")
        return cls(order, arrival[order].tolist(), inputs, outputs, limits)

    @classmethod
    def of_arrays(cls, arrivals: np.ndarray, inputs: np.ndarray, outputs: np.ndarray,
                  limits: np.ndarray | None = None) -> Trace:
        """`of` for requests held as arrays (limits 0 or None: the output length), without a SimRequest each."""
        order = np.argsort(arrivals, kind="stable")
        ins, outs = inputs[order], outputs[order]
        if len(ins) and (ins.min() < 1 or outs.min() < 1):
            raise SimulationError("every request needs input_len >= 1 and output_len >= 1")
        lims = outs if limits is None else np.where(limits[order] != 0, limits[order], outs)
        if np.any(lims < outs):
            raise SimulationError("a request's output_len exceeds its max_tokens")
        return cls(order, arrivals[order].tolist(), ins.tolist(), outs.tolist(), lims.tolist())

    def result(
        self, first_token: np.ndarray, last_token: np.ndarray, peaks: list[int], capacity: int,
        preemptions: int = 0, preempted_tokens: int = 0, request_latency_s: float = 0.0,
    ) -> SimResult:
        """Latencies from the first/last token times (arrival order), returned in the caller's order.

        `request_latency_s` (the served path's hops, `LatencyModel.request_latency_s`) delays every token's
        arrival at the client alike: TTFT and end-to-end time grow by it, TPOT does not change.
        """
        arrivals = np.asarray(self.arrivals)
        outputs = np.asarray(self.outputs)
        ttft = first_token - arrivals + request_latency_s
        e2e = last_token - arrivals + request_latency_s
        tpot = np.where(outputs > 1, (e2e - ttft) / np.maximum(outputs - 1, 1), 0.0)
        back = np.empty_like(self.order)
        back[self.order] = np.arange(len(self.order))
        return SimResult.from_arrays(ttft[back], tpot[back], e2e[back], peaks, capacity, preemptions,
                                     preempted_tokens)


def instance_capacity(latency: LatencyModel, shape: PhaseShape, mem_util: float, role: str) -> int:
    """KV capacity of one instance, or ModelDoesNotFitError naming the shape and the memory."""
    capacity = latency.kv_capacity_tokens(shape.tp, shape.pp, mem_util)
    if capacity <= 0:
        stage = latency.stage(shape.tp, shape.pp)
        raise ModelDoesNotFitError(
            f"{latency.model.name} does not fit a {role} instance of tp={shape.tp} pp={shape.pp} on "
            f"{latency.gpu.name}: each GPU needs {stage.weight_bytes / 2**30:.1f} GiB of weights plus "
            f"workspace, {mem_util:.0%} of {latency.gpu.memory_gib:g} GiB is usable; raise tp or pp"
        )
    return capacity


def check_fits(tokens: list[int], capacity: int, role: str, what: str) -> None:
    """RequestTooLargeError when the largest request cannot fit an instance's KV capacity."""
    if tokens and max(tokens) > capacity:
        raise RequestTooLargeError(
            f"a request needs {max(tokens)} KV tokens ({what}) but a {role} instance holds {capacity}; "
            "clip the trace to the model's context (SimRequest.clip) or give instances more memory"
        )


def as_trace(requests: Sequence[SimRequest] | Trace) -> Trace:
    """The trace of what a simulator was given: requests, or a trace built already."""
    return requests if isinstance(requests, Trace) else Trace.of(requests)
