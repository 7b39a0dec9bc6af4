"""Rendered children checked the way a real API server would, before any of them is applied.

kubernetes-validate checks each object against Kubernetes' own OpenAPI schemas (types, required fields,
unknown fields); the names, labels, selectors and resource names it leaves to the server's validation code
are checked here with the same grammars. A child that fails stops the whole apply, so a cluster never
holds half a rollout that the API server refused midway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import kubernetes_validate
from disagg_planner.api.kube_names import (
    extended_resource_error,
    is_dns1035_label,
    is_dns1123_label,
    is_dns1123_subdomain,
    label_value_error,
    qualified_name_error,
)

from . import labels as lb
from .errors import RenderError

KUBERNETES_VERSION = "1.29"  # the oldest release the operator supports; later ones accept these objects too
_NAME_RULES = {
    "Service": ("a DNS-1035 label", is_dns1035_label),
    "StatefulSet": ("a DNS-1123 label of at most 52 characters",
                    lambda n: len(n) <= lb.MAX_STATEFULSET_NAME and is_dns1123_label(n)),
    "Deployment": ("a DNS-1123 label", is_dns1123_label),
}
_STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage"}


def _labels_problems(where: str, labels: Mapping[str, Any] | None) -> list[str]:
    out = []
    for key, value in (labels or {}).items():
        for problem in (qualified_name_error(str(key)), label_value_error(str(value))):
            if problem:
                out.append(f"{where}: {problem}")
    return out


def _pod_problems(where: str, pod: Mapping[str, Any]) -> list[str]:
    out = _labels_problems(f"{where}.nodeSelector", pod.get("nodeSelector"))
    for i, tol in enumerate(pod.get("tolerations") or []):
        if tol.get("key") and (problem := qualified_name_error(tol["key"])):
            out.append(f"{where}.tolerations[{i}].key: {problem}")
    for c in pod.get("containers") or []:
        if not is_dns1123_label(str(c.get("name", ""))):
            out.append(f"{where}.containers: name {c.get('name')!r} is not a DNS-1123 label")
        resources = c.get("resources") or {}
        for name in {**(resources.get("requests") or {}), **(resources.get("limits") or {})}:
            if name not in _STANDARD_RESOURCES and (problem := extended_resource_error(name)):
                out.append(f"{where}.containers[{c.get('name')}].resources: {problem}")
        if not str(c.get("image", "")).strip():
            out.append(f"{where}.containers[{c.get('name')}].image is empty")
    return out


def child_problems(obj: Mapping[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Every reason a real API server would refuse `obj` (empty when it would accept it)."""
    kind, meta = obj.get("kind", "?"), obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    who = f"{kind}/{name}"
    out: list[str] = []
    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        out.append(f"{who}: {exc.message} at {'.'.join(str(p) for p in exc.path) or 'the top level'}")
    description, rule = _NAME_RULES.get(kind, ("a DNS-1123 subdomain", is_dns1123_subdomain))
    if not rule(name):
        out.append(f"{who}: the name is not {description}")
    out += _labels_problems(f"{who} metadata.labels", meta.get("labels"))
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    if template:
        out += _labels_problems(f"{who} template labels", (template.get("metadata") or {}).get("labels"))
        out += _labels_problems(f"{who} selector", (spec.get("selector") or {}).get("matchLabels"))
        out += _pod_problems(f"{who} pod", template.get("spec") or {})
    if kind == "Service":
        out += _labels_problems(f"{who} selector", spec.get("selector"))
    return out


def validate_children(children: Iterable[Mapping[str, Any]], version: str = KUBERNETES_VERSION) -> None:
    """RenderError listing every problem of every child; nothing may be applied when it raises."""
    problems = [p for obj in children for p in child_problems(obj, version)]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise RenderError(f"the rendered children would be refused by the API server, so none was applied: {shown}")
