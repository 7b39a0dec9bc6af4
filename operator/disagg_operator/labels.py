"""Labels, child names and selectors shared by the renderer, the reconciler and the pruner.

Selectors of workloads use only labels that never change for the life of the workload (name,
instance, component, and for worker groups the shape): StatefulSet and Deployment selectors are
immutable. The plan-hash label is on the children's own metadata, never in a pod template: a new
plan must not restart pods whose shape it keeps (changing a template label would).
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import RenderError

APP_NAME = "disagg"
MANAGED_BY = "disagg-operator"
FIELD_MANAGER = "disagg-operator"

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
MANAGED = "app.kubernetes.io/managed-by"
PART_OF = "app.kubernetes.io/part-of"
PHASE = "disagg.io/phase"
PLAN_HASH = "disagg.io/plan-hash"
STAGE = "disagg.io/stage"
SHAPE = "disagg.io/shape"

# A StatefulSet's pods carry a `controller-revision-hash` label of `<name>-<10 characters>`, which
# must fit a label value's 63: longer StatefulSet names are accepted and then never get pods.
MAX_NAME = 63
MAX_STATEFULSET_NAME = 52


def common_labels(instance: str, plan_hash: str) -> dict[str, str]:
    """Labels on every child of one DisaggServing."""
    return {NAME: APP_NAME, INSTANCE: instance, MANAGED: MANAGED_BY, PLAN_HASH: plan_hash}


def pod_labels(instance: str) -> dict[str, str]:
    """Labels on every runtime pod of one DisaggServing (no plan hash: see the module docstring)."""
    return {NAME: APP_NAME, INSTANCE: instance, MANAGED: MANAGED_BY}


def selector_labels(instance: str, component: str, shape: str | None = None) -> dict[str, str]:
    """The immutable pod selector of one workload; worker groups add their shape, so the workloads of
    two plans that run side by side during a rollout never select each other's pods."""
    labels = {NAME: APP_NAME, INSTANCE: instance, COMPONENT: component}
    if shape is not None:
        labels[SHAPE] = shape
    return labels


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def owned_selector(instance: str) -> str:
    """Every child of one DisaggServing (all plan hashes)."""
    return selector_string({NAME: APP_NAME, INSTANCE: instance, MANAGED: MANAGED_BY})


def managed_selector() -> str:
    """Every child of every DisaggServing (used by the orphan sweep)."""
    return selector_string({NAME: APP_NAME, MANAGED: MANAGED_BY})


def matches(labels: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    """Client-side re-check of an equality selector (cheap; guards against servers that ignore it)."""
    labels = labels or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def child_name(instance: str, component: str, *, limit: int = MAX_NAME) -> str:
    """`<instance>-<component>`, refused beyond `limit` characters (63: a Service/label value)."""
    name = f"{instance}-{component}"
    if len(name) > limit:
        raise RenderError(
            f"child name {name!r} is longer than {limit} characters; use a shorter DisaggServing name "
            f"(at most {limit - len(component) - 1} characters)"
        )
    return name


def worker_name(instance: str, component: str, shape: str) -> str:
    """`<instance>-<component>-<shape>`: a worker group's StatefulSet and headless Service."""
    return child_name(instance, f"{component}-{shape}", limit=MAX_STATEFULSET_NAME)
