"""Typed API of disagg: the spec tree (source of the CRD), the plan, and the latency-profile format."""

from .base import ApiModel
from .cluster import GPU_PRESETS, ClusterSpec, GPUSpec
from .deploy import ConfigMapKeyRef, ProfileRef, ReplanSpec, RuntimeSpec, SchedulingSpec, Toleration
from .model import MODEL_PRESETS, ModelRef, ModelSpec
from .plan import GoodputInterval, InstancePlacement, ModeAlternative, PhasePlan, Plan, ServingMode
from .profile import (
    DecodeOverheadPoint,
    DecodeSample,
    LatencyProfile,
    MixedSample,
    PrefillSample,
    ServedMode,
    ServedOverhead,
    ServedProbe,
    ShapeProfile,
)
from .security import InternalTokenSpec, NetworkPolicySpec, PeerSelector, RouterSpec, SecretKeyRef
from .slo import SearchBounds, SLOSpec
from .spec import DisaggServingSpec
from .workload import LengthHistogram, WorkloadSpec

__all__ = [
    "ApiModel", "ClusterSpec", "ConfigMapKeyRef", "DecodeOverheadPoint", "DecodeSample", "DisaggServingSpec", "GPUSpec", "GPU_PRESETS",
    "GoodputInterval", "InstancePlacement", "InternalTokenSpec", "LatencyProfile", "LengthHistogram",
    "MODEL_PRESETS", "MixedSample", "ModeAlternative", "ModelRef", "ModelSpec", "NetworkPolicySpec", "PeerSelector",
    "PhasePlan", "Plan", "ProfileRef", "PrefillSample", "ReplanSpec", "RouterSpec", "RuntimeSpec", "SLOSpec",
    "SchedulingSpec", "SearchBounds", "SecretKeyRef", "ServedMode", "ServedOverhead", "ServedProbe", "ServingMode", "ShapeProfile", "Toleration", "WorkloadSpec",
]
