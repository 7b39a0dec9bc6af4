"""Hand-made specs and plans for the operator's unit tests (the renderer's input, not planner output)."""

from __future__ import annotations

import dataclasses
from typing import Any

from disagg_operator.render import Owner, RenderInput
from disagg_planner.api import DisaggServingSpec, PhasePlan, Plan

OWNER = Owner(api_version="disagg.io/v1alpha1", kind="DisaggServing", name="chat", namespace="serving",
              uid="6c1f6d1e-0000-4000-8000-000000000001")


def spec(**over: Any) -> DisaggServingSpec:
    base: dict[str, Any] = {
        "model": {"preset": "opt-13b", "path": "/models/opt-13b"},
        "cluster": {"nodes": 2, "gpusPerNode": 8, "gpuType": "A100-80GB"},
        "workload": {"rate": 4.0, "dataset": "chatbot"},
        "slo": {"ttftMs": 250, "tpotMs": 100},
    }
    base.update(over)
    return DisaggServingSpec.model_validate(base)


def _plan(**fields: Any) -> Plan:
    defaults = dict(target_rate_rps=4.0, goodput_rps=5.0, per_gpu_goodput=0.5, predicted_attainment=0.95,
                    gain_over_colocated=2.1, colocated_per_gpu_goodput=0.24)
    return Plan(**{**defaults, **fields})


def high_plan() -> Plan:
    """3 prefill instances of tp2 and 1 decode instance of tp2pp2: 10 GPUs."""
    return _plan(mode="disaggregated", affinity="high", gpus=10,
                 prefill=PhasePlan(tp=2, pp=1, replicas=3, instance_goodput_rps=2.0),
                 decode=PhasePlan(tp=2, pp=2, replicas=1, instance_goodput_rps=6.0))


def low_plan() -> Plan:
    """2 units, each a 2-stage pipeline: stage s of prefill (tp2) and decode (tp1) share a node."""
    return _plan(mode="disaggregated", affinity="low", gpus=12,
                 prefill=PhasePlan(tp=2, pp=2, replicas=2, instance_goodput_rps=2.5),
                 decode=PhasePlan(tp=1, pp=2, replicas=2, instance_goodput_rps=2.5))


def colocated_plan() -> Plan:
    return _plan(mode="colocated", affinity="high", gpus=4, gain_over_colocated=None,
                 colocated=PhasePlan(tp=1, pp=1, replicas=4, instance_goodput_rps=1.2))


def render_input(plan: Plan, the_spec: DisaggServingSpec | None = None, *, owner_name: str | None = None,
                 **kw: Any) -> RenderInput:
    owner = OWNER if owner_name is None else dataclasses.replace(OWNER, name=owner_name)
    return RenderInput(owner=owner, spec=the_spec or spec(), plan=plan, plan_hash="0123456789abcdef-analytic", **kw)
