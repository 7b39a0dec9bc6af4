"""Placement search: the disaggregated plan with the highest per-GPU goodput, and the colocated baseline.

`estimate_system` is the one estimator every plan's goodput and attainment come from (any serving mode:
pass its simulator config); `search.confidence.goodput_interval` adds the interval.
"""

from .affinity import AffinityChoice, choose_affinity
from .estimator import Estimate, SystemCurve, config_bound, estimate_system
from .goodput import goodput
from .latency_source import latency_model
from .planner import find_colocated_plan, find_plan
from .replay import RatePoint, attainment_curve, plan_config

__all__ = [
    "AffinityChoice", "Estimate", "RatePoint", "SystemCurve", "attainment_curve", "choose_affinity", "config_bound",
    "estimate_system", "find_colocated_plan", "find_plan", "goodput", "latency_model", "plan_config",
]
