"""Small DisaggServing specs (quick to plan on 2 cores) and what their children must look like."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from disagg_planner.api import MODEL_PRESETS, LatencyProfile, PhasePlan, Plan, ShapeProfile
from disagg_planner.api.profile import DecodeSample, PrefillSample

SMALL: dict[str, Any] = {
    "model": {"preset": "opt-13b", "path": "/models/opt-13b"},
    "cluster": {"nodes": 2, "gpusPerNode": 4, "gpuType": "A100-80GB"},
    "workload": {"rate": 1.0, "dataset": "chatbot"},
    "slo": {"ttftMs": 2000, "tpotMs": 200},
    "search": {"maxTp": 1, "maxPp": 1},  # one shape per phase: plans in ~0.6 s on 2 cores
    "scheduling": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


def small(**overrides: Any) -> dict[str, Any]:
    """SMALL with top-level sections replaced."""
    spec = copy.deepcopy(SMALL)
    spec.update(copy.deepcopy(overrides))
    return spec


def expected_workloads(name: str, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """StatefulSet name -> {replicas, gpus per container role} implied by a plan (status.plan)."""
    if plan["mode"] == "colocated":
        p = plan["colocated"]
        return {f"{name}-colocated": {"replicas": p["replicas"], "gpus": {"colocated": p["tp"] * p["pp"]}}}
    pre, dec = plan["prefill"], plan["decode"]
    if plan["affinity"] == "high":
        return {
            f"{name}-prefill": {"replicas": pre["replicas"], "gpus": {"prefill": pre["tp"] * pre["pp"]}},
            f"{name}-decode": {"replicas": dec["replicas"], "gpus": {"decode": dec["tp"] * dec["pp"]}},
        }
    return {f"{name}-segment-s{s}": {"replicas": pre["replicas"], "gpus": {"prefill": pre["tp"], "decode": dec["tp"]}}
            for s in range(pre["pp"])}


def by_group(children: dict[str, dict[str, Any]], kind: str = "StatefulSet") -> dict[str, dict[str, Any]]:
    """Worker objects of one kind by `<instance>-<component>`: their names end in `-<shape id>`."""
    out = {}
    for key, obj in children.items():
        shape = obj["metadata"]["labels"].get("disagg.io/shape")
        if key.startswith(f"{kind}/") and shape:
            name = obj["metadata"]["name"]
            assert name.endswith(f"-{shape}"), name
            out[name[:-len(shape) - 1]] = obj
    return out


def container_gpus(sts: dict[str, Any]) -> dict[str, int]:
    containers = sts["spec"]["template"]["spec"]["containers"]
    return {c["name"]: int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in containers}


def profile_json(*, gpu: str = "A100-80GB", per_token_s: float = 1e-4) -> str:
    """A latency profile of SMALL's model (opt-13b, tp1 pp1), as `disagg profile` writes it: a step costs
    20 ms plus `per_token_s` per prompt token (prefill) or per sequence in the batch (decode)."""
    shape = ShapeProfile(
        prefill=[PrefillSample(batch_size=1, sum_tokens=n, sum_sq_tokens=n * n, seconds=0.02 + n * per_token_s)
                 for n in (64, 256, 1024)],
        decode=[DecodeSample(batch_size=b, sum_context=b * 100, seconds=0.02 + b * per_token_s) for b in (1, 8, 32)])
    return LatencyProfile(model=MODEL_PRESETS["opt-13b"], gpu=gpu, shapes=[shape],
                          created=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)).model_dump_json(by_alias=True)


def fixed_plan(rate: float, *, prefill: tuple[int, int], decode: tuple[int, int]) -> Plan:
    """A high-affinity plan of `(tp, replicas)` per phase, for tests about what the operator does with it."""
    (ptp, preps), (dtp, dreps) = prefill, decode
    return Plan(mode="disaggregated", affinity="high",
                prefill=PhasePlan(tp=ptp, pp=1, replicas=preps, instance_goodput_rps=1.0),
                decode=PhasePlan(tp=dtp, pp=1, replicas=dreps, instance_goodput_rps=1.0),
                gpus=ptp * preps + dtp * dreps, target_rate_rps=rate, goodput_rps=rate * 1.2,
                per_gpu_goodput=rate * 1.2 / (ptp * preps + dtp * dreps), predicted_attainment=0.95)
