"""What a plan misses and why: a target the budget cannot serve, and when the KV link is the cause.

A search that finds its best plan below the attainment target still answers with that plan (it is the most
the budget can do), and this says by how much it falls short, so the operator reports TargetNotMet with
the numbers instead of a plain success.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.plan import Plan
from ..api.profile import LatencyProfile
from ..api.spec import DisaggServingSpec
from ..api.units import format_bandwidth
from .latency_source import latency_model
from .problem import SearchProblem

# KV transfer of a mean prompt taking more than this share of the latency the SLOs allow a mean request
# makes the link, not the GPUs, what limits a disaggregated plan across nodes.
LINK_BLAME_SHARE = 0.25


@dataclass(frozen=True)
class TargetShortfall:
    """A plan below its target: the target rate and attainment, and what the plan achieves."""

    target_rate_rps: float
    target_attainment: float
    goodput_rps: float  # the highest rate the plan serves at the target attainment
    predicted_attainment: float  # at the target rate
    gpus: int
    cause: str | None = None  # e.g. the KV link, when it is what limits the plan

    def message(self) -> str:
        text = (f"the plan on {self.gpus} GPUs reaches {self.predicted_attainment:.1%} SLO attainment at the target "
                f"{self.target_rate_rps:.3g} req/s (target {self.target_attainment:.0%}); it sustains "
                f"{self.goodput_rps:.3g} req/s at that attainment")
        return f"{text}; {self.cause}" if self.cause else (
            f"{text}; raise search.gpuBudget (or the cluster), lower workload.rate or relax the SLOs")


def shortfall(plan: Plan, spec: DisaggServingSpec, profile: LatencyProfile | None = None) -> TargetShortfall | None:
    """None when the plan meets the attainment target at the target rate; else the shortfall and its cause."""
    if plan.predicted_attainment >= spec.slo.attainment:
        return None
    cause = None
    if plan.mode == "disaggregated" and spec.cluster.nodes > 1:
        cause = link_cause(SearchProblem.of(spec, latency_model(spec, profile), seed=0))
    return TargetShortfall(target_rate_rps=plan.target_rate_rps, target_attainment=spec.slo.attainment,
                           goodput_rps=plan.goodput_rps, predicted_attainment=plan.predicted_attainment,
                           gpus=plan.gpus, cause=cause)


def link_cause(problem: SearchProblem) -> str | None:
    """A sentence blaming the inter-node link when moving a mean prompt's KV over it eats the latency budget."""
    stats, model = problem.stats, problem.latency.model
    kv_bytes = stats.mean_input * model.kv_bytes_per_token
    transfer_s = kv_bytes / (problem.inter_node_gbps * 1e9)
    allowed_s = problem.ttft_s + stats.mean_output * problem.tpot_s
    if transfer_s < LINK_BLAME_SHARE * allowed_s:
        return None
    link = format_bandwidth(problem.inter_node_gbps * 1e9)
    return (f"the inter-node link is the bottleneck: at cluster.interNodeBandwidth={link} "
            f"moving a mean {stats.mean_input:.0f}-token prompt's KV cache ({kv_bytes / 1e6:.0f} MB) takes "
            f"{transfer_s * 1000:.0f} ms, {transfer_s / allowed_s:.0%} of the {allowed_s * 1000:.0f} ms the SLOs allow "
            "a mean request; use a faster network (raise cluster.interNodeBandwidth if it is faster), nodes with "
            "enough GPUs for a prefill and a decode instance each, or serve colocated")
