"""From a plan to pod shapes and their scheduling constraints.

High node-affinity plans (and colocated ones) place every instance on its own: one workload per
phase, one pod per instance holding its `tp x pp` GPUs, spread across nodes with a
`topologySpreadConstraint` on `kubernetes.io/hostname` (soft: `ScheduleAnyway`, so a cluster
with fewer free nodes than instances still runs the plan, packed).

Low node-affinity plans need the prefill and decode segments of the same pipeline stage on one
node, so KV caches move over NVLink instead of the network. Two ways were weighed:

- *pod affinity on a pairing label*: prefill and decode pods of a stage carry a pair label and
  decode pods require affinity to the prefill pod with the same label. Rejected: a StatefulSet
  template gives every pod the same labels, so per-pair labels need one workload per pair; and
  the scheduler places the two pods one at a time, so the first can take a node with no room for
  the second and leave it Pending for good (no gang scheduling).
- *one pod per node-segment* (chosen): a pod holds two containers, the prefill segment and the
  decode segment, requesting both GPU sets at once. A pod always lands on one node, so co-location
  holds by construction, scheduling is atomic, and the two containers share the pod's IPC
  namespace (CUDA IPC / NCCL over NVLink without `hostIPC`). When a whole prefill-decode unit fits
  one node, the segment is the whole unit: one `unit` StatefulSet, one pod per unit, each container
  running a whole instance. Otherwise one StatefulSet per pipeline stage (`segment-s<k>`), one pod
  per unit, containers started with `--stage k`.

Each worker group's workloads are named after its shape (`WorkerGroup.shape_id`, a digest of what its
pods run, not of how many there are): a plan that changes a group's parallelism renders a workload of
a new name, which rolls out beside the running one (see `rollout.py`), while a plan that only changes
replica counts scales the running workload in place. A colocated group's scheduler (chunked prefill and
its token budget) is part of its shape: switching it rolls out beside the running workload too.

GPU node selectors come from the cluster's GPU name (`nvidia.com/gpu.product` by default) merged
with `spec.scheduling.nodeSelector` (the user's keys win); a CPU "cluster" requests no GPUs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from disagg_planner.api import DisaggServingSpec, PhasePlan, Plan

from .errors import RenderError

Role = Literal["prefill", "decode", "colocated"]
HOSTNAME_KEY = "kubernetes.io/hostname"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Segment:
    """What one container of a worker pod runs: a whole instance, or one pipeline stage of it."""

    role: Role
    tp: int
    pp: int
    stage: int | None = None
    scheduler: str | None = None  # colocated chunked prefill: "chunked-<budget>"; None: the role's default

    @property
    def gpus(self) -> int:
        return self.tp if self.stage is not None else self.tp * self.pp


@dataclass(frozen=True)
class WorkerGroup:
    """One StatefulSet: `replicas` identical pods, each running `segments` side by side."""

    component: str
    phase: str  # the disagg.io/phase label: prefill, decode, colocated or paired
    replicas: int
    segments: tuple[Segment, ...]
    # What else the pods' identity depends on (the internal token's version): a new revision renders a
    # workload of a new name, which rolls out beside the serving one like a new shape does.
    revision: str = ""

    @property
    def gpus_per_pod(self) -> int:
        return sum(s.gpus for s in self.segments)

    @property
    def gpus(self) -> int:
        return self.gpus_per_pod * self.replicas

    @property
    def shape_id(self) -> str:
        """6 hex digits naming what each pod runs (containers, parallelism, stage); replicas left out."""
        # A scheduler is named only when set, so that the workloads of plans without one keep their names.
        shape = [self.component, self.phase,
                 [[s.role, s.tp, s.pp, s.stage, *([s.scheduler] if s.scheduler else [])] for s in self.segments]]
        if self.revision:
            shape.append(self.revision)
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:6]


def worker_groups(plan: Plan, spec: DisaggServingSpec) -> list[WorkerGroup]:
    """The worker StatefulSets a plan needs, in a stable order."""
    per_node = spec.cluster.gpus_per_node
    if plan.mode == "colocated":
        chunked = f"chunked-{plan.chunk_token_budget}" if plan.colocated_prefill == "chunked" else None
        groups = [_whole_instances("colocated", _need(plan.colocated, "colocated"), chunked)]
    elif plan.affinity == "high":
        groups = [_whole_instances("prefill", _need(plan.prefill, "prefill")),
                  _whole_instances("decode", _need(plan.decode, "decode"))]
    else:
        groups = _paired_segments(_need(plan.prefill, "prefill"), _need(plan.decode, "decode"), per_node)
    for group in groups:
        if group.gpus_per_pod > per_node:
            raise RenderError(
                f"{group.component} pods need {group.gpus_per_pod} GPUs but nodes have {per_node}; "
                f"lower search.maxTp/search.maxPp or describe bigger nodes in cluster.gpusPerNode"
            )
    return groups


def _need(phase: PhasePlan | None, name: str) -> PhasePlan:
    if phase is None:
        raise RenderError(f"the plan has no {name} phase; it cannot be rendered (planner bug: report it)")
    return phase


def _whole_instances(role: Role, phase: PhasePlan, scheduler: str | None = None) -> WorkerGroup:
    return WorkerGroup(component=role, phase=role, replicas=phase.replicas,
                       segments=(Segment(role, phase.tp, phase.pp, scheduler=scheduler),))


def _paired_segments(prefill: PhasePlan, decode: PhasePlan, per_node: int) -> list[WorkerGroup]:
    if prefill.pp != decode.pp or prefill.replicas != decode.replicas:
        raise RenderError(
            "a low node-affinity plan must pair prefill and decode instances one to one with the same "
            f"pipeline depth; got prefill {prefill.replicas}x pp{prefill.pp}, decode {decode.replicas}x pp{decode.pp}"
        )
    if prefill.gpus_per_instance + decode.gpus_per_instance <= per_node:
        return [WorkerGroup(component="unit", phase="paired", replicas=prefill.replicas,
                            segments=(Segment("prefill", prefill.tp, prefill.pp),
                                      Segment("decode", decode.tp, decode.pp)))]
    return [
        WorkerGroup(component=f"segment-s{stage}", phase="paired", replicas=prefill.replicas,
                    segments=(Segment("prefill", prefill.tp, prefill.pp, stage),
                              Segment("decode", decode.tp, decode.pp, stage)))
        for stage in range(prefill.pp)
    ]


def node_selector(spec: DisaggServingSpec, gpu_product_label: str) -> dict[str, str]:
    """The GPU-type selector merged with the user's node selector (the user's keys win)."""
    user = dict(spec.scheduling.node_selector)
    gpu = spec.cluster.gpu_spec
    if uses_gpus(spec) and gpu_product_label and gpu_product_label not in user:
        if not _LABEL_VALUE.match(gpu.name) or len(gpu.name) > 63:
            raise RenderError(
                f"GPU name {gpu.name!r} is not a valid label value for {gpu_product_label}; set "
                f"spec.scheduling.nodeSelector[{gpu_product_label!r}] to the value your nodes carry"
            )
        return {gpu_product_label: gpu.name, **user}
    return user


def uses_gpus(spec: DisaggServingSpec) -> bool:
    """False for the CPU preset: pods then request no accelerator at all (kind, CI clusters)."""
    return spec.cluster.gpu_spec.name != "CPU"


def spread_constraints(selector: dict[str, str]) -> list[dict[str, Any]]:
    """Spread one workload's pods over nodes, softly (see the module docstring)."""
    return [{
        "maxSkew": 1,
        "topologyKey": HOSTNAME_KEY,
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": dict(selector)},
    }]


def tolerations(spec: DisaggServingSpec) -> list[dict[str, Any]]:
    return [t.to_wire() for t in spec.scheduling.tolerations]
