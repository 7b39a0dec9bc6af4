"""Control-loop scenarios on a `LoopRig` and what they measure (e2e tests and bench/control_loop.py).

`run_scenario` creates the DisaggServing, waits until it serves, replays the phased load, and samples
the resource and the node once every `sample_s` meanwhile. What it returns holds each plan change (when
the operator applied it, what it was), the ready worker pods per phase over time, and every request's
outcome, from which `ScenarioResult` derives the figures the issue asks for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from disagg_operator.telemetry.replan import parse_rfc3339
from disagg_runtime.benchclient.client import RequestRecord

from .loop_harness import LoopRig, loop_spec, wait_until
from .traffic import Phase, PhasedLoad, window_attainment


@dataclass(frozen=True)
class PlanChange:
    """A plan the operator applied: when (wall clock), and its shape."""

    time: float
    plan_hash: str
    shape: str  # e.g. "disaggregated P1x(tp1,pp1) D3x(tp1,pp1)"
    rate_planned: float


@dataclass
class ScenarioResult:
    name: str
    interval_s: float
    phases: list[Phase]
    t0: float
    step_time: float | None
    plans: list[PlanChange]
    samples: list[dict[str, Any]]
    records: list[RequestRecord]
    slo: tuple[float, float]
    initial_workers: dict[str, int] = field(default_factory=dict)

    @property
    def rollouts(self) -> list[PlanChange]:
        """Plan changes after the first plan."""
        return self.plans[1:]

    @property
    def failed(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.ok]

    @property
    def reaction_intervals(self) -> float | None:
        """From the step to the first new plan applied, in re-plan intervals."""
        if self.step_time is None:
            return None
        after = [p for p in self.rollouts if p.time >= self.step_time]
        return (after[0].time - self.step_time) / self.interval_s if after else None

    @property
    def detection_intervals(self) -> float | None:
        """From the step to the drift being confirmed (status.replan.replannedTime, 1 s resolution), in
        intervals: the part of the reaction that telemetry and hysteresis decide, planning time excluded."""
        if self.step_time is None:
            return None
        stamps = sorted({parse_rfc3339(s["replanned"]) for s in self.samples if s.get("replanned")})
        after = [t for t in stamps if t >= self.step_time - 1.0]
        return (after[0] - self.step_time) / self.interval_s if after else None

    def failed_during_rollout(self) -> int:
        """Failed requests sent between a rollout's start and the end of the run."""
        if not self.rollouts:
            return 0
        start = self.rollouts[0].time - self.t0
        return sum(1 for r in self.failed if r.sent >= start)

    def min_capacity_ratio(self) -> float:
        """Lowest ready worker count per phase, relative to before any rollout (1.0: never below)."""
        worst = 1.0
        for s in self.samples:
            for phase, n in self.initial_workers.items():
                worst = min(worst, s["workers"].get(phase, 0) / n)
        return worst

    def attainment_windows(self, window_s: float) -> list[tuple[float, float, int]]:
        return window_attainment(self.records, self.t0, window_s, *self.slo)

    def min_attainment_during_transition(self, window_s: float) -> float | None:
        """Lowest windowed attainment from the step until the last rollout's pods were ready (+1 window)."""
        if self.step_time is None or not self.rollouts:
            return None
        end = self.rollouts[-1].time + 2 * window_s
        values = [a for t, a, n in self.attainment_windows(window_s) if self.step_time <= t + window_s and t <= end]
        return min(values) if values else None

    def summary(self, window_s: float) -> dict[str, Any]:
        return {"scenario": self.name, "interval_s": self.interval_s, "requests": len(self.records),
                "failed_requests": len(self.failed), "rollouts": len(self.rollouts),
                "reaction_intervals": self.reaction_intervals, "detection_intervals": self.detection_intervals,
                "failed_requests_during_rollout": self.failed_during_rollout(),
                "min_capacity_ratio": self.min_capacity_ratio(),
                "min_attainment_during_transition": self.min_attainment_during_transition(window_s),
                "plans": [p.shape for p in self.plans],
                "errors": [f"{r.status}: {r.error}" for r in self.failed][:5]}


def plan_shape(plan: dict[str, Any]) -> str:
    if plan.get("mode") == "colocated" or "colocated" in plan and plan.get("prefill") is None:
        c = plan["colocated"]
        return f"colocated {c['replicas']}x(tp{c['tp']},pp{c['pp']})"
    p, d = plan["prefill"], plan["decode"]
    return (f"{plan.get('mode', 'disaggregated')} P{p['replicas']}x(tp{p['tp']},pp{p['pp']}) "
            f"D{d['replicas']}x(tp{d['tp']},pp{d['pp']})")


def run_scenario(rig: LoopRig, name: str, phases: list[Phase], *, step_phase: int | None,
                 interval_s: int, window_s: int, sample_s: float = 0.25, seed: int = 0,
                 **spec_extra: Any) -> ScenarioResult:
    """Serve `name` for `phases` (the first phase's workload is the spec's); see the module docstring."""
    assert rig.kubectl is not None and rig.agent is not None
    first = phases[0]
    spec = loop_spec(first.rate, input_lengths=first.input_lengths, output_lengths=first.output_lengths,
                     interval_s=interval_s, window_s=window_s, **spec_extra)
    rig.kubectl.create(name, spec)
    wait_until(lambda: rig.kubectl.status(name).get("phase") == "Ready", 180, f"{name} Ready")
    wait_until(lambda: rig.agent.ready_pods(f"{name}-router"), 60, "router pod ready")
    plans: list[PlanChange] = []
    samples: list[dict[str, Any]] = []

    def sample() -> None:
        status = rig.kubectl.status(name)
        plan = status.get("plan") or {}
        key = json.dumps(plan, sort_keys=True)
        if plan and (not plans or plans[-1].plan_hash != key):
            plans.append(PlanChange(time.time(), key, plan_shape(plan), float(plan.get("targetRateRps", 0.0))))
        replan = status.get("replan") or {}
        samples.append({"time": time.time(), "workers": rig.workers(), "phase": status.get("phase"),
                        "replan": replan.get("lastResult"), "replanned": replan.get("replannedTime")})

    sample()
    initial = dict(samples[-1]["workers"])
    with rig.agent.port_forward(name) as url:
        load = PhasedLoad(url, phases, seed=seed).start()
        deadline = load.t0 + load.duration_s + 60
        while load._thread is not None and load._thread.is_alive() and time.time() < deadline:
            sample()
            time.sleep(sample_s)
        records = load.join(timeout=60)
    slo = (spec["slo"]["ttftMs"] / 1000, spec["slo"]["tpotMs"] / 1000)
    return ScenarioResult(name=name, interval_s=float(interval_s), phases=phases, t0=load.t0,
                          step_time=load.phase_start(step_phase) if step_phase is not None else None,
                          plans=plans, samples=samples, records=records, slo=slo, initial_workers=initial)
