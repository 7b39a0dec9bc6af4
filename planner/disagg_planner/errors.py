"""Planner errors: each names what is wrong and what would fix it, so the CLI and the operator can show it as is."""

from __future__ import annotations


class PlannerError(Exception):
    """Base of every error the planner raises on purpose (bad input or an impossible problem)."""


class NoFeasiblePlan(PlannerError):
    """No placement can meet the SLOs within the GPU budget; `reason` says which limit binds and by how much."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"no feasible plan: {reason}")

    def __reduce__(self):  # pickled by the reason alone, so it crosses a process boundary unchanged
        return (type(self), (self.reason,))


class PlanningTimeout(PlannerError):
    """The search did not finish within its deadline and was stopped; `deadline_s` says how long it had."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        super().__init__(
            f"the placement search did not finish within its {deadline_s:g}s deadline and was stopped; "
            "shrink the search (search.gpuBudget, search.maxTp, search.maxPp) or raise the planning deadline"
        )

    def __reduce__(self):
        return (type(self), (self.deadline_s,))


class PlanningCancelled(PlannerError):
    """The search was stopped because its answer was no longer wanted."""
