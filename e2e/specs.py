"""Small DisaggServing specs (quick to plan on 2 cores) and what their children must look like."""

from __future__ import annotations

import copy
from typing import Any

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
