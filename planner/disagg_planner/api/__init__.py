"""Typed API of disagg: the spec tree (source of the CRD), the plan, and the latency-profile format."""

from .base import ApiModel
from .cluster import GPU_PRESETS, ClusterSpec, GPUSpec
from .deploy import ConfigMapKeyRef, ProfileRef, ReplanSpec, RuntimeSpec, SchedulingSpec, Toleration
from .model import MODEL_PRESETS, ModelRef, ModelSpec
from .plan import GoodputInterval, InstancePlacement, PhasePlan, Plan
from .profile import DecodeSample, LatencyProfile, PrefillSample, ShapeProfile
from .slo import SearchBounds, SLOSpec
from .spec import DisaggServingSpec
from .workload import LengthHistogram, WorkloadSpec

__all__ = [
    "ApiModel", "ClusterSpec", "ConfigMapKeyRef", "DecodeSample", "DisaggServingSpec", "GPUSpec", "GPU_PRESETS",
    "GoodputInterval", "InstancePlacement", "LatencyProfile", "LengthHistogram", "MODEL_PRESETS", "ModelRef",
    "ModelSpec",
    "PhasePlan", "Plan", "ProfileRef", "PrefillSample", "ReplanSpec", "RuntimeSpec", "SLOSpec", "SchedulingSpec",
    "SearchBounds", "ShapeProfile", "Toleration", "WorkloadSpec",
]
