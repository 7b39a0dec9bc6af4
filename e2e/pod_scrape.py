"""Prometheus' view of the node agent's pods: file-based service discovery with Kubernetes' meta labels,
and the `kubernetes-pods` scrape job that clusters commonly run (the prometheus-community chart's).

The agent writes one target per declared container port of every running pod, labelled exactly as
Prometheus' Kubernetes pod discovery labels it (`__meta_kubernetes_pod_*`, label and annotation names
sanitised to `[a-zA-Z0-9_]`). `KUBERNETES_PODS_RELABEL` then does what that job does: keep pods
annotated `prometheus.io/scrape: "true"`, take the path and port from `prometheus.io/path` and
`prometheus.io/port`, map pod labels to target labels, and add `namespace` and `pod`. So the operator's
telemetry reads series labelled as on a real cluster (telemetry/names.py, `ScrapeLabels`), and a pod
whose annotations or ports are wrong is simply not scraped, as it would not be there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .pod_process import PodProcess

KUBERNETES_PODS_RELABEL: list[dict[str, Any]] = [
    {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "action": "keep",
     "regex": "true"},
    {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"], "action": "replace",
     "target_label": "__metrics_path__", "regex": "(.+)"},
    {"source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"], "action": "replace",
     "regex": r"([^:]+)(?::\d+)?;(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
    {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "action": "replace", "target_label": "pod"},
    {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Succeeded|Failed|Completed",
     "action": "drop"},
]


def sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def file_sd_targets(pods: Iterable[PodProcess]) -> list[dict[str, Any]]:
    """Target groups for Prometheus' file_sd, one per container port (or per pod without ports)."""
    groups = []
    for pod in pods:
        meta, spec = pod.pod["metadata"], pod.pod["spec"]
        common = {"__meta_kubernetes_namespace": meta.get("namespace", ""),
                  "__meta_kubernetes_pod_name": meta["name"], "__meta_kubernetes_pod_ip": pod.iface.ip,
                  "__meta_kubernetes_pod_ready": "true" if pod.ready else "false",
                  "__meta_kubernetes_pod_phase": "Running",
                  "__meta_kubernetes_pod_node_name": spec.get("nodeName", "")}
        for k, v in (meta.get("labels") or {}).items():
            common[f"__meta_kubernetes_pod_label_{sanitize(k)}"] = v
            common[f"__meta_kubernetes_pod_labelpresent_{sanitize(k)}"] = "true"
        for k, v in (meta.get("annotations") or {}).items():
            common[f"__meta_kubernetes_pod_annotation_{sanitize(k)}"] = v
            common[f"__meta_kubernetes_pod_annotationpresent_{sanitize(k)}"] = "true"
        ports = [(c, p) for c in spec["containers"] for p in c.get("ports") or []]
        if not ports:
            groups.append({"targets": [pod.iface.ip], "labels": common})
        for container, port in ports:
            groups.append({"targets": [f"{pod.iface.ip}:{port['containerPort']}"], "labels": {
                **common, "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}})
    return groups


def kubernetes_pods_job(sd_file: str, *, job_name: str = "kubernetes-pods") -> dict[str, Any]:
    """The scrape config: file_sd over the agent's target file, relabelled as the Kubernetes job does."""
    return {"job_name": job_name, "file_sd_configs": [{"files": [sd_file], "refresh_interval": "1s"}],
            "relabel_configs": KUBERNETES_PODS_RELABEL}
