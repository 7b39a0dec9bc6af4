"""Checks that end a search before it starts: the model must fit the budget, the SLOs must beat the idle latency.

Each failure raises NoFeasiblePlan with the numbers a user needs: which limit, the best achievable value,
and on which shape.
"""

from __future__ import annotations

import numpy as np

from ..errors import NoFeasiblePlan
from .capacity import unloaded_tpot, unloaded_tpot_share, unloaded_ttft, unloaded_ttft_share
from .problem import SearchProblem
from .shapes import Shape


def require_shapes(shapes: list[Shape], problem: SearchProblem, budget: int, instances_needed: int) -> None:
    """The model fits at least `instances_needed` instances of its smallest shape within the budget."""
    lat = problem.latency
    model = lat.model
    if not shapes:
        weights = model.weight_bytes / 2**30
        raise NoFeasiblePlan(
            f"{model.name} ({weights:.0f} GiB of weights) fits no instance shape within the GPU budget of {budget} "
            f"{lat.gpu.name} GPU(s) ({lat.gpu.memory_gib:g} GiB each) and the tp/pp bounds; raise "
            "search.gpuBudget, search.maxTp or search.maxPp, or use GPUs with more memory"
        )
    smallest = min(s.gpus for s in shapes)
    if instances_needed * smallest > budget:
        raise NoFeasiblePlan(
            f"disaggregation needs a prefill and a decode instance, {instances_needed} x {smallest} GPUs for "
            f"{model.name}, but the GPU budget is {budget}; raise search.gpuBudget or serve colocated"
        )


def require_slos(shapes: list[Shape], problem: SearchProblem) -> None:
    """Some shape meets each SLO for at least the target share of requests when serving them one at a time."""
    lat, stats, target = problem.latency, problem.stats, problem.target
    quantile_prompt = int(np.quantile(stats.inputs, target))
    quantile_context = float(np.quantile(stats.inputs + stats.outputs / 2, target))

    def link(s: Shape) -> float:
        return problem.stage_link(s.gpus)

    ttft_share = {s: unloaded_ttft_share(lat, s, stats, problem.ttft_s, link(s)) for s in shapes}
    best = max(shapes, key=lambda s: (ttft_share[s], -unloaded_ttft(lat, s, quantile_prompt, link(s))))
    if ttft_share[best] < target:
        idle = unloaded_ttft(lat, best, quantile_prompt, link(best))
        raise NoFeasiblePlan(
            f"the TTFT SLO of {problem.ttft_s * 1000:g} ms is below the unloaded latency: even alone on the "
            f"fastest shape ({best}) the {target:.0%}-quantile prompt ({quantile_prompt} tokens) takes "
            f"{idle * 1000:.0f} ms to prefill, so at most {ttft_share[best]:.1%} of requests can meet it "
            f"(target {target:.0%}); relax slo.ttftMs or slo.attainment"
        )
    tpot_share = {s: unloaded_tpot_share(lat, s, stats, problem.tpot_s, link(s)) for s in shapes}
    best = max(shapes, key=lambda s: (tpot_share[s], -unloaded_tpot(lat, s, quantile_context, link(s))))
    if tpot_share[best] < target:
        idle = unloaded_tpot(lat, best, quantile_context, link(best))
        raise NoFeasiblePlan(
            f"the TPOT SLO of {problem.tpot_s * 1000:g} ms is below the unloaded latency: even alone on the "
            f"fastest shape ({best}) a decode step takes {idle * 1000:.1f} ms at the {target:.0%}-quantile "
            f"context ({quantile_context:.0f} tokens), so at most {tpot_share[best]:.1%} of requests can meet "
            f"it (target {target:.0%}); relax slo.tpotMs or slo.attainment"
        )
