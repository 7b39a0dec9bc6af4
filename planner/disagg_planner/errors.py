"""Planner errors: each names what is wrong and what would fix it, so the CLI and the operator can show it as is."""

from __future__ import annotations


class PlannerError(Exception):
    """Base of every error the planner raises on purpose (bad input or an impossible problem)."""


class NoFeasiblePlan(PlannerError):
    """No placement can meet the SLOs within the GPU budget; `reason` says which limit binds and by how much."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"no feasible plan: {reason}")
