"""How the operator rolls a plan out: runtime image, scheduling, drift-driven re-planning, the latency profile."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel


class RuntimeSpec(ApiModel):
    """The runtime pods (router, prefill and decode workers)."""

    image: str = Field(default="ghcr.io/disagg/runtime:0.1.0", min_length=1, max_length=512)
    kv_channel: Literal["auto", "nccl", "ipc", "tcp"] = Field(
        default="auto", description="auto picks per prefill-decode pair by where the ends sit."
    )
    kv_compression: Literal["none", "fp8"] = "none"
    prefill_token_budget: int = Field(default=4096, ge=16, le=1 << 20, description="Tokens per prefill batch.")
    max_prompt_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    router_replicas: int = Field(default=1, ge=1, le=64)


class Toleration(ApiModel):
    """A pod toleration, passed through to every runtime pod."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class SchedulingSpec(ApiModel):
    """Where runtime pods may go."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name for GPUs.")


class ReplanSpec(ApiModel):
    """Periodic re-planning against the workload Prometheus observes."""

    enabled: bool = False
    interval_seconds: int = Field(default=300, ge=1, le=86400)
    prometheus_url: str | None = Field(default=None, max_length=2048)
    window_seconds: int = Field(default=600, ge=5, le=86400, description="Look-back for rates and histograms.")
    rate_change: float = Field(default=0.2, gt=0, le=10, description="Relative arrival-rate change that is drift.")
    length_change: float = Field(
        default=0.2, gt=0, le=10, description="Relative change of mean input or output length that is drift."
    )
    stable_intervals: int = Field(
        default=2, ge=1, le=100, description="Consecutive drifted readings before a re-plan (hysteresis)."
    )
    step_change: float | None = Field(
        default=1.0, gt=0, le=100,
        description="Relative change that re-plans on one reading, without waiting for stableIntervals: a step "
        "this large is not noise. Null: always wait.",
    )
    min_requests: int = Field(
        default=50, ge=1, le=10_000_000, description="Requests a reading needs in its window to judge drift."
    )


class ConfigMapKeyRef(ApiModel):
    """One key of a ConfigMap in the DisaggServing's own namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                      description="ConfigMap name.")
    key: str = Field(default="profile.json", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key under the ConfigMap's data holding the LatencyProfile JSON.")


class ProfileRef(ApiModel):
    """Where the operator reads the latency profile to plan with (`disagg profile` writes the JSON).

    Without it the operator uses a profile it ships for the model shape and GPU type, else the
    analytic roofline.
    """

    config_map_ref: ConfigMapKeyRef
