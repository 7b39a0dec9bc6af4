"""Which serving mode to deploy: disaggregated, colocated (prefill priority) or colocated with chunked prefill.

spec.mode auto evaluates all three and deploys, among those whose plan meets the target rate at the
attainment target, the one with the highest per-GPU goodput; on an exact tie, fewer GPUs, then the order
disaggregated, colocated, colocated-chunked. When none meets the target, the one that serves the most of
the target rate (then per GPU) is deployed, and the reason says so. An explicit mode is obeyed: colocated
takes the better of the two colocated schedulers by the same rule; disaggregated is deployed whatever its
colocated baseline does (which is still evaluated, for the gain the plan reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..api.plan import ModeAlternative, ServingMode
from ..errors import NoFeasiblePlan
from .problem import SearchProblem
from .system import Measured

SpecMode = Literal["auto", "disaggregated", "colocated"]

_EVALUATED: dict[str, tuple[ServingMode, ...]] = {
    "auto": ("disaggregated", "colocated", "colocated-chunked"),
    "disaggregated": ("disaggregated", "colocated"),  # colocated: the baseline the gain is reported against
    "colocated": ("colocated", "colocated-chunked"),
}
_DEPLOYABLE: dict[str, tuple[ServingMode, ...]] = {
    "auto": _EVALUATED["auto"],
    "disaggregated": ("disaggregated",),
    "colocated": ("colocated", "colocated-chunked"),
}


@dataclass(frozen=True)
class ModeOutcome:
    """The best plan one mode found (`measured`), or why it found none (`note`)."""

    mode: ServingMode
    measured: Measured | None
    note: str = ""

    @property
    def per_gpu(self) -> float:
        m = self.measured
        return m.goodput / m.candidate.gpus if m is not None else 0.0

    @property
    def gpus(self) -> int:
        return self.measured.candidate.gpus if self.measured is not None else 0

    def meets(self, target: float) -> bool:
        return self.measured is not None and self.measured.goodput > 0 and self.measured.meets(target)

    def alternative(self, target: float) -> ModeAlternative:
        m = self.measured
        chunk = m.candidate.chunk_budget if m is not None and m.candidate.chunk_budget else None
        return ModeAlternative(mode=self.mode, per_gpu_goodput=self.per_gpu, goodput_rps=m.goodput if m else 0.0,
                               gpus=self.gpus, meets_target=self.meets(target), chunk_token_budget=chunk,
                               note=self.note)


def modes_to_evaluate(spec_mode: SpecMode) -> tuple[ServingMode, ...]:
    """The modes the search runs for spec.mode, in tie-break order."""
    return _EVALUATED[spec_mode]


def best_of(outcomes: Sequence[ModeOutcome], target: float) -> ModeOutcome:
    """One mode's outcome from several tries (the two node-affinity algorithms): the better plan by `_rank`."""
    found = [o for o in outcomes if o.measured is not None and o.measured.goodput > 0]
    if not found:
        return ModeOutcome(outcomes[0].mode, None, "; ".join(o.note for o in outcomes if o.note))
    return max(found, key=lambda o: _rank(o, target, float("inf")))


def _rank(o: ModeOutcome, target: float, rate: float) -> tuple:
    """Larger is better: meets the target; then per-GPU goodput (or, short of the target, the rate served)."""
    m = o.measured
    assert m is not None
    if o.meets(target):
        return True, o.per_gpu, 0.0, -o.gpus
    return False, min(m.goodput, rate), o.per_gpu, -o.gpus


def choose(outcomes: Sequence[ModeOutcome], spec_mode: SpecMode, target: float, rate: float) -> ModeOutcome:
    """The outcome to deploy (see the module doc); NoFeasiblePlan, with every mode's reason, when none has one."""
    allowed = [o for o in outcomes if o.mode in _DEPLOYABLE[spec_mode]]
    found = [o for o in allowed if o.measured is not None and o.measured.goodput > 0]
    if not found:
        if len(allowed) == 1:
            raise NoFeasiblePlan(allowed[0].note or f"{allowed[0].mode} serving has no goodput at any rate")
        raise NoFeasiblePlan("; ".join(f"{o.mode}: {o.note or 'no goodput at any rate'}" for o in allowed))
    return max(found, key=lambda o: _rank(o, target, rate))  # max keeps the first among equals


def colocated_per_gpu(outcomes: Sequence[ModeOutcome]) -> float:
    """The best colocated per-GPU goodput (either scheduler): the baseline the plan's gain is against."""
    return max((o.per_gpu for o in outcomes if o.mode != "disaggregated"), default=0.0)


def explain(chosen: ModeOutcome, outcomes: Sequence[ModeOutcome], problem: SearchProblem) -> str:
    """One line: which mode, its per-GPU goodput, and what the others reached."""
    target, rate = problem.target, problem.target_rate
    others = [o for o in outcomes if o is not chosen]

    def brief(o: ModeOutcome) -> str:
        if o.measured is None:
            return f"{o.mode} infeasible"
        miss = "" if o.meets(target) else ", misses target"
        return f"{o.mode} {o.per_gpu:.3g}/GPU on {o.gpus}{miss}"

    head = f"{chosen.mode}: {chosen.per_gpu:.3g} req/s per GPU on {chosen.gpus} GPUs"
    if not chosen.meets(target):
        why = f"no mode meets {rate:.3g} req/s at {target:.0%} attainment; it serves the most of it"
    elif len([o for o in outcomes if o.meets(target)]) == 1 and others:
        why = f"the only mode meeting {rate:.3g} req/s"
    elif not others:
        why = "the only mode evaluated"
    else:
        why = f"the most per GPU among modes meeting {rate:.3g} req/s"
    tail = f" ({', '.join(brief(o) for o in others)})" if others else ""
    return f"{head}, {why}{tail}"
