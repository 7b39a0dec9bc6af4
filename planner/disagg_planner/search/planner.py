"""The placement search (DistServe §4, Algorithms 1 and 2) and its colocated baseline.

1. Per-instance goodput of every shape, a phase at a time, by simulation + bisection on rate, skipping
   shapes dominated by cheaper ones (runner.branch_and_bound).
2. Replica counts for every combination of shapes under the GPU budget (allocate.py), ranked by goodput
   capped at the target rate, then fewest GPUs.
3. The best few that pack onto the nodes are simulated whole (both phases, KV over the link the placement
   implies) and grown where they miss the target (system.py); the best measured one is the plan.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

from ..api.plan import GoodputInterval, ModeAlternative, PhasePlan, Plan, ServingMode
from ..api.profile import LatencyProfile
from ..api.spec import DisaggServingSpec
from ..errors import NoFeasiblePlan
from . import modes
from .affinity import Affinity, choose_affinity
from .allocate import Candidate, colocated_candidates, disaggregated_candidates, ranked, unit_candidates
from .chunked import chunk_budgets
from .confidence import choose, contenders, goodput_interval
from .evaluate import PhaseTask, capacity
from .feasibility import require_shapes, require_slos
from .latency_source import latency_model
from .problem import IDEAL_LINK_GBPS, SearchProblem
from .runner import Item, PhaseCache, Progress, TaskPool, branch_and_bound
from .shapes import Segments, Shape, instance_shapes, segment_units
from .shortfall import link_cause
from .system import Layout, Measured, estimate, fit, place

# Whole-system simulations per search: the best-ranked candidates that pack onto the nodes.
SYSTEM_CANDIDATES = 3
ALTERNATE_CANDIDATES = 2  # for the node-affinity algorithm the network does not favour
COLOCATED_CANDIDATES = 2


@dataclass
class _Session:
    """One search's shared state: the problem, the worker pool, the phase-goodput cache and progress."""

    spec: DisaggServingSpec
    problem: SearchProblem
    pool: TaskPool
    progress: Progress | None
    seed: int = 0
    cache: PhaseCache = field(default_factory=PhaseCache)
    reseeded: dict[int, SearchProblem] = field(default_factory=dict)
    intervals: dict[int, GoodputInterval] = field(default_factory=dict)
    total: int = 0
    done: int = 0
    estimate_all: bool = False
    bisect_counts: bool = False

    @property
    def layout(self) -> Layout:
        c = self.spec.cluster
        return Layout(c.nodes, c.gpus_per_node, self.spec.gpu_budget)

    def shapes(self) -> list[Shape]:
        c, lat = self.spec.cluster, self.problem.latency
        return instance_shapes(lat, self.spec.search, c.gpus_per_node, self.spec.gpu_budget, lat.model.num_layers)

    def units(self) -> list[Segments]:
        c, lat = self.spec.cluster, self.problem.latency
        return segment_units(lat, self.spec.search, c.gpus_per_node, self.spec.gpu_budget, lat.model.num_layers)

    # -- progress ------------------------------------------------------------------------------------
    def expect(self, items: int) -> None:
        self.total += items
        self._report()

    def tick(self, n: int) -> None:
        self.done += n
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    # -- step 1: per-instance goodputs ----------------------------------------------------------------
    def _item(self, key: object, gpus: int, tasks: tuple[PhaseTask, ...]) -> Item:
        return Item(key, gpus, min(capacity(self.problem, t) for t in tasks), tasks)

    def phase_goodputs(
        self, kind: Literal["prefill", "decode", "colocated"], shapes: list[Shape], kv_link: float = IDEAL_LINK_GBPS
    ) -> dict:
        """Instance goodput of every shape not dominated; decode instances receive KV over `kv_link`."""
        link = self.problem.stage_link
        items = [self._item(s, s.gpus, (PhaseTask(kind, s, link(s.gpus), kv_link),)) for s in shapes]
        self.expect(len(items))
        return branch_and_bound(items, self.problem, self.cache, self.pool, self.tick)

    def chunked_goodputs(self, shapes: list[Shape]) -> dict[tuple[Shape, int], float]:
        """Instance goodput of chunked-prefill colocated shapes, each at the chunk budgets derived for it."""
        p = self.problem
        items = []
        for s in shapes:
            link = p.stage_link(s.gpus)
            for budget in chunk_budgets(p.token_budget):
                items.append(self._item((s, budget), s.gpus, (PhaseTask("colocated-chunked", s, link,
                                                                        chunk_budget=budget),)))
        self.expect(len(items))
        return branch_and_bound(items, p, self.cache, self.pool, self.tick)

    def unit_goodputs(self, units: list[Segments]) -> dict[Segments, tuple[float, float]]:
        items = []
        for u in units:
            link = self.problem.stage_link((u.prefill_tp + u.decode_tp) * u.pp)
            items.append(self._item(u, u.gpus, (PhaseTask("prefill", u.prefill, link),
                                                 PhaseTask("decode", u.decode, link, self.problem.intra_node_gbps))))
        self.expect(len(items))
        kept = branch_and_bound(items, self.problem, self.cache, self.pool, self.tick)
        return {it.key: (self.cache.goodput[it.tasks[0]], self.cache.goodput[it.tasks[1]])
                for it in items if it.key in kept}

    # -- steps 2-3: replicate, place, simulate whole --------------------------------------------------
    def measure_best(self, candidates: list[Candidate], limit: int) -> list[Measured]:
        """Whole-system measurements of the `limit` best-ranked candidates that pack onto the nodes.

        All are fitted; only those `best` can pick get their goodput estimated (`contenders`), unless the
        session estimates every one (`estimate_all`, the reference path the tests compare against).
        """
        layout = self.layout
        chosen = []
        for cand in ranked(candidates, self.problem.target_rate):
            if place(cand, layout) is not None:
                chosen.append(cand)
            if len(chosen) == limit:
                break
        self.expect(len(chosen))
        fitted = [f for f in self.pool.map(partial(fit, self.problem, layout, bisect=self.bisect_counts), chosen) if f is not None]
        if not self.estimate_all:
            fitted = contenders(fitted, self.problem.target, self.problem.target_rate)
        measured = self.pool.map(partial(estimate, self.problem), fitted)
        self.tick(len(chosen))
        return measured

    def best(self, measured: list[Measured]) -> Measured | None:
        """Meets the target first, then fewest GPUs among statistical ties (confidence.choose)."""
        return choose(measured, self.problem.target_rate, gpus=lambda m: m.candidate.gpus,
                      goodput=lambda m: m.goodput, meets=lambda m: m.meets(self.problem.target),
                      interval=self.interval)

    # -- confidence -----------------------------------------------------------------------------------
    def problem_on(self, seed: int) -> SearchProblem:
        """The search problem on another seed's request sample (same model, SLOs and rate)."""
        if seed not in self.reseeded:
            base = self.problem
            self.reseeded[seed] = base if seed == self.seed else SearchProblem.of(self.spec, base.latency, seed,
                                                                                  base.rel_tol)
        return self.reseeded[seed]

    def interval(self, m: Measured) -> GoodputInterval:
        """The goodput interval of a measured candidate (computed once; REPEATS whole-system searches)."""
        key = id(m)
        if key not in self.intervals:
            self.intervals[key] = goodput_interval(self.problem_on, self.seed, m.config, m.bound, m.goodput,
                                                   self.pool)
        return self.intervals[key]


def _open(spec: DisaggServingSpec, profile: LatencyProfile | None, workers: int | None,
          progress: Progress | None, seed: int) -> _Session:
    problem = SearchProblem.of(spec, latency_model(spec, profile), seed)
    return _Session(spec, problem, TaskPool(workers if workers is not None else (os.cpu_count() or 1)), progress,
                    seed)


def _colocated(session: _Session, shapes: list[Shape], chunked: bool = False) -> Measured:
    """The best colocated plan: prefill-priority steps, or (`chunked`) chunked prefill mixed into decode steps."""
    rate, budget = session.problem.target_rate, session.spec.gpu_budget
    # The phase cache makes the second call free when the prefill-priority mode was evaluated already.
    priority = session.phase_goodputs("colocated", shapes)
    if chunked:
        # Chunked instances are simulated only in the shapes that prefill priority does not dominate: the
        # chunked rate bound (either phase alone) is too loose to prune with, and a shape dominated under one
        # colocated scheduler rarely wins under the other (both share its memory and step costs).
        kept = [s for s in shapes if s in priority] or shapes
        candidates = [replace(c, chunk_budget=chunk)
                      for (shape, chunk), value in session.chunked_goodputs(kept).items()
                      for c in colocated_candidates({shape: value}, rate, budget)]
    else:
        candidates = colocated_candidates(priority, rate, budget)
    best = session.best(session.measure_best(candidates, COLOCATED_CANDIDATES))
    if best is None:
        what = "chunked-prefill colocated" if chunked else "colocated"
        raise NoFeasiblePlan(
            f"no {what} configuration within the budget of {budget} GPUs reaches "
            f"{session.problem.target:.0%} SLO attainment at any rate; relax the SLOs or raise search.gpuBudget"
        )
    return best


def _disaggregated(session: _Session, shapes: list[Shape], affinity: Affinity, alternate: bool = False) -> Measured:
    """The best disaggregated plan of one node-affinity algorithm (DistServe Algorithm 1 or 2).

    An `alternate` (the affinity the network does not favour, tried second) has fewer candidates simulated whole.
    """
    spec, problem, budget = session.spec, session.problem, session.spec.gpu_budget
    require_shapes(shapes, problem, budget, 2)
    blame = (link_cause(problem) if spec.cluster.nodes > 1 else None) or ""
    if affinity == "high":
        smallest = min(s.gpus for s in shapes)  # the other phase needs at least this many
        pair_shapes = [s for s in shapes if s.gpus + smallest <= budget]
        prefill = session.phase_goodputs("prefill", pair_shapes)
        # KV crosses the network unless the whole cluster is one node.
        kv_link = problem.intra_node_gbps if spec.cluster.nodes == 1 else problem.inter_node_gbps
        decode = session.phase_goodputs("decode", pair_shapes, kv_link)
        candidates = disaggregated_candidates(prefill, decode, problem.target_rate, budget)
    else:
        units = session.units()
        if not units:
            raise NoFeasiblePlan(
                f"low node-affinity placement puts a prefill and a decode segment of each stage on one "
                f"{spec.cluster.gpus_per_node}-GPU node, and no such split of {problem.latency.model.name} "
                f"fits memory within search.maxPp={spec.search.max_pp} and the budget of {budget} GPUs; "
                "raise search.maxPp or the budget"
                + (f" ({blame}; low affinity was chosen for that reason)" if blame else "")
            )
        candidates = unit_candidates(session.unit_goodputs(units), problem.target_rate, budget)
    limit = ALTERNATE_CANDIDATES if alternate else SYSTEM_CANDIDATES
    best = session.best(session.measure_best(candidates, limit))
    if best is None:
        raise NoFeasiblePlan(
            f"no disaggregated configuration within the budget of {budget} GPUs reaches "
            f"{problem.target:.0%} SLO attainment at any rate ({affinity} node-affinity); "
            + (blame if blame else "relax the SLOs or raise search.gpuBudget")
        )
    return best


def _phase_plan(shape: Shape, replicas: int, goodput: float) -> PhasePlan:
    return PhasePlan(tp=shape.tp, pp=shape.pp, replicas=replicas, instance_goodput_rps=goodput)


def _plan(session: _Session, m: Measured, colocated_per_gpu: float | None,
          alternatives: list[ModeAlternative] | None = None, choice: str = "") -> Plan:
    cand = m.candidate
    per_gpu = m.goodput / cand.gpus
    common = dict(
        placement=m.placement, gpus=cand.gpus, target_rate_rps=session.problem.target_rate,
        goodput_rps=m.goodput, per_gpu_goodput=per_gpu, predicted_attainment=m.attainment_at_target,
        colocated_per_gpu_goodput=colocated_per_gpu,
        gain_over_colocated=(per_gpu / colocated_per_gpu) if colocated_per_gpu else None,
        goodput_interval=session.interval(m),
        latency_source=session.problem.latency.source, spec_hash=session.spec.planning_hash(),
        alternatives=alternatives or [], choice=choice,
    )
    if cand.mode == "colocated":
        chunked = cand.chunk_budget > 0
        return Plan(mode="colocated", affinity="high",
                    colocated=_phase_plan(cand.prefill, cand.n_prefill, cand.prefill_goodput),
                    colocated_prefill="chunked" if chunked else "priority",
                    chunk_token_budget=cand.chunk_budget if chunked else None, **common)
    return Plan(mode="disaggregated", affinity=cand.affinity,
                prefill=_phase_plan(cand.prefill, cand.n_prefill, cand.prefill_goodput),
                decode=_phase_plan(cand.decode, cand.n_decode, cand.decode_goodput), **common)


def find_colocated_plan(
    spec: DisaggServingSpec, profile: LatencyProfile | None = None, *, workers: int | None = None,
    progress: Callable[[int, int], None] | None = None, seed: int = 0,
) -> Plan:
    """The best colocated plan (DistServe's "vLLM++": the same search over one instance type running both phases)."""
    session = _open(spec, profile, workers, progress, seed)
    with session.pool:
        shapes = session.shapes()
        require_shapes(shapes, session.problem, spec.gpu_budget, 1)
        require_slos(shapes, session.problem)
        best = _colocated(session, shapes)
        return _plan(session, best, best.goodput / best.candidate.gpus)  # inside: the interval uses the pool


def find_plan(
    spec: DisaggServingSpec, profile: LatencyProfile | None = None, *, workers: int | None = None,
    progress: Callable[[int, int], None] | None = None, seed: int = 0, affinity: Affinity | None = None,
    deadline_s: float | None = None, estimate_all: bool = False, bisect_counts: bool = False,
) -> Plan:
    """The plan of the serving mode with the highest per-GPU goodput (spec.mode; see modes.py).

    `spec.mode` auto evaluates disaggregated serving, colocated prefill-priority and colocated chunked
    prefill, and the plan lists each as an alternative; an explicit mode is obeyed (a disaggregated plan
    still reports its colocated baseline). `affinity` forces DistServe's high or low node-affinity algorithm
    (default: the one the network favours, see affinity.py, and high affinity too where that is low). `seed` picks
    the simulated request sample; the same seed gives the same plan whatever `workers` is. Raises
    NoFeasiblePlan when the model does not fit the budget, an SLO is below the unloaded latency or no
    evaluated mode has goodput, PlannerError for an unusable profile. With `deadline_s` the search runs in a
    child process stopped at the deadline (PlanningTimeout; see deadline.py). `estimate_all` estimates the
    goodput of every candidate simulated whole, not only of those the choice among them can pick: the same
    plan at a higher cost (the reference the tests hold the faster path to). `bisect_counts` fits replica
    counts by bisection alone, not trying the capacity bound's count first (system._shrink; the reference).
    """
    if deadline_s is not None:
        from .deadline import plan_within

        return plan_within(find_plan, spec, profile, deadline_s=deadline_s, progress=progress, workers=workers,
                           seed=seed, affinity=affinity, estimate_all=estimate_all,
                           bisect_counts=bisect_counts)
    session = _open(spec, profile, workers, progress, seed)
    session.estimate_all, session.bisect_counts = estimate_all, bisect_counts
    problem = session.problem
    with session.pool:
        shapes = session.shapes()
        require_shapes(shapes, problem, spec.gpu_budget, 2 if spec.mode == "disaggregated" else 1)
        require_slos(shapes, problem)
        preferred = affinity or choose_affinity(problem, spec.cluster.nodes).affinity
        # Where the network favours low affinity, high is tried too (its freer pairing may still pay). Where it
        # favours high (one node, or KV transfer negligible on the network), low affinity only restricts high
        # (same-stage pairs, KV on NVLink saving a negligible time), so it is not tried.
        both = affinity is None and preferred == "low"
        affinities: tuple[Affinity, ...] = (preferred, "high") if both else (preferred,)
        outcomes: list[modes.ModeOutcome] = []
        for mode in modes.modes_to_evaluate(spec.mode):
            if mode == "disaggregated":
                tried = [_attempt(lambda a=a, k=k: _disaggregated(session, shapes, a, k), mode)
                         for k, a in enumerate(affinities)]
                outcomes.append(modes.best_of(tried, problem.target))
            else:
                chunked = mode == "colocated-chunked"
                outcomes.append(_attempt(lambda c=chunked: _colocated(session, shapes, c), mode))
        chosen = modes.choose(outcomes, spec.mode, problem.target, problem.target_rate)
        # Inside the pool: the plan's goodput interval re-measures the chosen configuration on it.
        return _plan(session, chosen.measured, modes.colocated_per_gpu(outcomes),
                     [o.alternative(problem.target) for o in outcomes], modes.explain(chosen, outcomes, problem))


def _attempt(run: Callable[[], Measured], mode: ServingMode) -> modes.ModeOutcome:
    try:
        return modes.ModeOutcome(mode, run())
    except NoFeasiblePlan as exc:
        return modes.ModeOutcome(mode, None, exc.reason)
