"""The DisaggServing spec: the one tree that the CLI reads and the CRD schema is generated from."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from .base import ApiModel
from .cluster import ClusterSpec
from .deploy import ProfileRef, ReplanSpec, RuntimeSpec, SchedulingSpec
from .model import ModelRef
from .security import InternalTokenSpec, NetworkPolicySpec, RouterSpec
from .slo import SearchBounds, SLOSpec
from .workload import WorkloadSpec


class DisaggServingSpec(ApiModel):
    """What to serve, on what hardware, for which workload and SLOs; how to roll it out."""

    model: ModelRef
    cluster: ClusterSpec
    workload: WorkloadSpec
    slo: SLOSpec
    search: SearchBounds = Field(default_factory=SearchBounds)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    replan: ReplanSpec = Field(default_factory=ReplanSpec)
    profile: ProfileRef | None = Field(
        default=None, description="A measured latency profile in a ConfigMap; the planner fits its model to it."
    )
    paused: bool = Field(default=False, description="Plan and report only; apply nothing (what-if mode).")
    mode: Literal["auto", "disaggregated", "colocated"] = Field(
        default="auto",
        description="Serving mode. auto: evaluate disaggregated, colocated (prefill priority) and colocated with "
        "chunked prefill, deploy the highest per-GPU goodput that meets the target rate. colocated: the better "
        "of the two colocated schedulers.",
    )
    router: RouterSpec = Field(default_factory=RouterSpec)
    internal_token: InternalTokenSpec = Field(default_factory=InternalTokenSpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)

    @model_validator(mode="after")
    def _budget_within_cluster(self) -> DisaggServingSpec:
        budget = self.search.gpu_budget
        if budget is not None and budget > self.cluster.total_gpus:
            raise ValueError(
                f"search.gpuBudget {budget} exceeds the cluster's {self.cluster.total_gpus} GPUs"
            )
        return self

    @model_validator(mode="after")
    def _lengths_within_context(self) -> DisaggServingSpec:
        # Named datasets are truncated to the context (as their clients do); explicit histograms are the
        # user's own lengths, and the runtime refuses a prompt plus output beyond the context with 400.
        inputs, outputs = self.workload.input_lengths, self.workload.output_lengths
        if inputs is None or outputs is None:
            return self
        context = self.model.spec.max_context
        if inputs.max_served + outputs.min_served > context:
            raise ValueError(
                f"workload.inputLengths reaches {inputs.max_served} tokens and workload.outputLengths starts at "
                f"{outputs.min_served}, beyond the {context}-token context of {self.model.spec.name}: the runtime "
                "refuses such requests with 400; cap the histograms at the context or serve a longer-context model"
            )
        limit = self.runtime.max_prompt_tokens
        if limit is not None and inputs.max_served > limit:
            raise ValueError(
                f"workload.inputLengths reaches {inputs.max_served} tokens but runtime.maxPromptTokens is {limit}: "
                "the runtime refuses longer prompts with 400; raise runtime.maxPromptTokens or cap the histogram"
            )
        return self

    @property
    def gpu_budget(self) -> int:
        return self.search.gpu_budget or self.cluster.total_gpus

    def deprecations(self) -> list[str]:
        """Notes on deprecated fields the spec was written with (converted; the operator puts them in
        status.warnings, the CLI prints them)."""
        return self.cluster.deprecations()

    def planning_hash(self) -> str:
        """Hash of the fields that change the plan (not the image, scheduling or replan settings).

        `profile` is left out: where it points is not what matters, the profile's content is, and the
        operator adds a digest of that content to its planning cache key.
        """
        keys = ("model", "cluster", "workload", "slo", "search")
        payload = {k: getattr(self, k).model_dump(mode="json") for k in keys}
        payload["model"].pop("path", None)
        payload["prefill_token_budget"] = self.runtime.prefill_token_budget  # the simulator batches by it
        payload["mode"] = self.mode
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
