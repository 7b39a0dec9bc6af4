"""Plan: the search's answer, reported in the CR status and rendered into workloads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel

Phase = Literal["prefill", "decode", "colocated"]
# The serving modes the planner compares: colocated-chunked is colocated with chunked prefill.
ServingMode = Literal["disaggregated", "colocated", "colocated-chunked"]


class PhasePlan(ApiModel):
    """One phase's instance shape and count."""

    tp: int = Field(ge=1, description="Tensor (intra-op) parallel degree.")
    pp: int = Field(ge=1, description="Pipeline (inter-op) parallel degree.")
    replicas: int = Field(ge=1)
    instance_goodput_rps: float = Field(ge=0, description=(
        "Goodput of one instance simulated alone (its phase only), req/s. The plan's goodput is the whole "
        "system simulated together, so it need not equal replicas x this."))

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.gpus_per_instance * self.replicas


class InstancePlacement(ApiModel):
    """Where one pipeline stage of one instance sits: a node and GPU indices on it."""

    phase: Phase
    instance: int = Field(ge=0)
    stage: int = Field(ge=0)
    node: int = Field(ge=0)
    gpus: list[int]


class ModeAlternative(ApiModel):
    """The best plan of one serving mode, as the mode choice saw it."""

    mode: ServingMode
    per_gpu_goodput: float = Field(ge=0)
    goodput_rps: float = Field(ge=0)
    gpus: int = Field(ge=0, description="0 when the mode has no feasible plan.")
    meets_target: bool = Field(description="Simulated attainment at the target rate meets the SLO attainment.")
    chunk_token_budget: int | None = Field(default=None, ge=1, description="colocated-chunked: tokens per step.")
    note: str = Field(default="", description="Why the mode has no plan, when it has none.")


class GoodputInterval(ApiModel):
    """How sure the plan is of its goodput: where the goodput of a fresh request trace would fall.

    `method` "repeated-seeds": the plan's configuration is re-measured on `seeds` (fresh request samples of
    the same workload, the plan's own seed first), and the interval is a normal prediction interval for one
    more draw at `coverage`, widened by the bisection's tolerance (see search/estimator.py).
    """

    low_rps: float = Field(ge=0)
    high_rps: float = Field(ge=0)
    coverage: float = Field(gt=0, lt=1, description="Share of fresh traces whose goodput the interval is meant to hold.")
    method: Literal["repeated-seeds"] = "repeated-seeds"
    seeds: list[int] = Field(default_factory=list, description="Seeds of the request samples measured.")
    samples_rps: list[float] = Field(default_factory=list, description="Goodput on each of `seeds`.")


class Plan(ApiModel):
    """A placement with its predicted goodput; `mode` says which of the phase fields are set."""

    mode: Literal["disaggregated", "colocated"]
    affinity: Literal["high", "low"] = Field(
        description="high: instances placed independently; low: same-stage prefill/decode share a node."
    )
    prefill: PhasePlan | None = None
    decode: PhasePlan | None = None
    colocated: PhasePlan | None = None
    placement: list[InstancePlacement] = Field(default_factory=list)
    gpus: int = Field(ge=1)
    target_rate_rps: float = Field(ge=0, description="Workload rate the plan was made for.")
    goodput_rps: float = Field(ge=0, description="Highest rate meeting the attainment target.")
    per_gpu_goodput: float = Field(ge=0)
    predicted_attainment: float = Field(
        ge=0, le=1, description=("Simulated steady-state attainment at the target rate (0 past the plan's capacity); "
                                 ">= the SLO's attainment exactly when goodput_rps >= target_rate_rps."))
    goodput_interval: GoodputInterval | None = Field(
        default=None, description="Prediction interval for goodput over fresh request traces.")
    colocated_per_gpu_goodput: float | None = Field(default=None, ge=0, description="Best colocated baseline.")
    gain_over_colocated: float | None = Field(default=None, ge=0)
    latency_source: Literal["profile", "analytic"] = "analytic"
    spec_hash: str = ""
    colocated_prefill: Literal["priority", "chunked"] | None = Field(
        default=None, description="Colocated plans: prefill-priority steps, or chunked prefill mixed into decode steps.")
    chunk_token_budget: int | None = Field(
        default=None, ge=1, description="Chunked prefill: tokens per mixed step (running decodes + prompt chunks).")
    alternatives: list[ModeAlternative] = Field(
        default_factory=list, description="The best plan of every serving mode evaluated (spec.mode auto).")
    choice: str = Field(default="", description="Why this mode was deployed, in one line.")

    @property
    def serving_mode(self) -> ServingMode:
        """disaggregated, colocated or colocated-chunked (the mode names of `alternatives`)."""
        if self.mode == "colocated" and self.colocated_prefill == "chunked":
            return "colocated-chunked"
        return self.mode
