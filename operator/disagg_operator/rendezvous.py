"""Rank rendezvous of multi-GPU instances: the env and args that let a pod's ranks find their instance's rank 0.

The runtime (`disagg serve --tp T --pp P`, disagg_runtime.parallel.launcher) launches a pod's ranks itself
and joins them through MASTER_ADDR, MASTER_PORT and WORLD_SIZE. A pod holding a whole instance hosts rank 0
itself (MASTER_ADDR 127.0.0.1). A low node-affinity instance spans one pod per pipeline stage, one per
`segment-s<k>` StatefulSet, with the same ordinal in each: stage k's pod launches ranks k*T..k*T+T-1
(from --stage) and finds rank 0 at the stable hostname of the stage-0 pod with its own ordinal, through
the stage-0 headless Service (the ordinal comes from the `apps.kubernetes.io/pod-index` label). Prefill
ranks outside rank 0's pod serve their KV share on their own pod IP, which they advertise.
"""

from __future__ import annotations

from typing import Any

from .topology import Segment

# The TCPStore of each role's rank 0 (prefill and decode segments may share a pod, so they differ).
RENDEZVOUS_PORTS = {"prefill": 29500, "decode": 29501, "colocated": 29502}
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def rank_env(seg: Segment, stage0_service: str | None, namespace: str) -> list[dict[str, Any]]:
    """Env of a container running `seg`: empty for a one-GPU instance."""
    world = seg.tp * seg.pp
    if world == 1:
        return []
    env: list[dict[str, Any]] = []
    if seg.stage is None or stage0_service is None:
        addr = "127.0.0.1"
    else:
        env += [{"name": "POD_INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
        addr = f"{stage0_service}-$(POD_INDEX).{stage0_service}.{namespace}.svc"
    return env + [{"name": "MASTER_ADDR", "value": addr},
                  {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORTS[seg.role])},
                  {"name": "WORLD_SIZE", "value": str(world)}]


def rank_args(seg: Segment) -> list[str]:
    """Extra `disagg serve` flags: prefill ranks of a multi-pod instance advertise their pod IP."""
    if seg.stage is not None and seg.role == "prefill" and seg.tp * seg.pp > 1:
        return ["--advertise-host", "$(POD_IP)"]
    return []


def serves_http(seg: Segment) -> bool:
    """Only the pod holding rank 0 (stage 0) serves HTTP; later stages' ranks follow it."""
    return seg.stage in (None, 0)
