"""Placement search: the disaggregated plan with the highest per-GPU goodput, and the colocated baseline."""

from .affinity import AffinityChoice, choose_affinity
from .goodput import goodput
from .latency_source import latency_model
from .planner import find_colocated_plan, find_plan
from .replay import RatePoint, attainment_curve, plan_config

__all__ = [
    "AffinityChoice", "RatePoint", "attainment_curve", "choose_affinity", "find_colocated_plan", "find_plan",
    "goodput", "latency_model", "plan_config",
]
