"""Labels, child names and selectors shared by the renderer, the reconciler and the pruner.

Selectors of workloads use only labels that never change for the life of a DisaggServing
(name, instance, component): StatefulSet and Deployment selectors are immutable, while the
plan-hash label moves with every new plan and is what pruning keys on.
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


def common_labels(instance: str, plan_hash: str) -> dict[str, str]:
    """Labels on every child of one DisaggServing."""
    return {NAME: APP_NAME, INSTANCE: instance, MANAGED: MANAGED_BY, PLAN_HASH: plan_hash}


def selector_labels(instance: str, component: str) -> dict[str, str]:
    """The immutable pod selector of one workload."""
    return {NAME: APP_NAME, INSTANCE: instance, COMPONENT: component}


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


def child_name(instance: str, component: str) -> str:
    """`<instance>-<component>`, cut to the 63 characters a Service/label value allows."""
    name = f"{instance}-{component}"
    if len(name) > 63:
        raise RenderError(
            f"child name {name!r} is longer than 63 characters; use a shorter DisaggServing name "
            f"(at most {63 - len(component) - 1} characters)"
        )
    return name
