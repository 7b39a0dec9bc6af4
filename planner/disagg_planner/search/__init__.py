"""Placement search: the disaggregated plan with the highest per-GPU goodput, and the colocated baseline."""

from .goodput import goodput
from .planner import find_colocated_plan, find_plan, latency_model

__all__ = ["find_colocated_plan", "find_plan", "goodput", "latency_model"]
