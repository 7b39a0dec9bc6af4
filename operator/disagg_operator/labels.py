"""Labels, child names and selectors shared by the renderer, the reconciler and the pruner.

Selectors of workloads use only labels that never change for the life of the workload (name,
instance, component, and for worker groups the shape): StatefulSet and Deployment selectors are
immutable. The plan-hash label is on the children's own metadata, never in a pod template: a new
plan must not restart pods whose shape it keeps (changing a template label would).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from disagg_planner.api.kube_names import is_dns1035_label, label_value_error

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


_HASH_LEN = 6


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]


def instance_value(instance: str) -> str:
    """The instance label's value: the DisaggServing's name, or (over 63 characters) a hashed short form."""
    return instance if label_value_error(instance) is None else base_name(instance, MAX_NAME)


def base_name(instance: str, room: int) -> str:
    """A DNS-1035 label of at most `room` characters standing for the DisaggServing `instance`.

    A CR name is a DNS-1123 subdomain: it may hold dots, start with a digit and run to 253 characters, none
    of which a Service name may. Such names are mapped to lowercase letters, digits and '-', prefixed when
    they do not start with a letter, cut to fit, and then end in a hash of the full name, so two
    resources whose names map alike ("chat.bot", "chat-bot") still get different children.
    """
    if len(instance) <= room and is_dns1035_label(instance):
        return instance
    clean = re.sub(r"[^a-z0-9]+", "-", instance.lower()).strip("-")
    if not clean[:1].isalpha():
        clean = f"d-{clean}".rstrip("-")
    head = clean[:max(room - _HASH_LEN - 1, 1)].rstrip("-")
    return f"{head}-{_digest(instance)}"


def common_labels(instance: str, plan_hash: str) -> dict[str, str]:
    """Labels on every child of one DisaggServing."""
    return {NAME: APP_NAME, INSTANCE: instance_value(instance), MANAGED: MANAGED_BY, PLAN_HASH: plan_hash}


def pod_labels(instance: str) -> dict[str, str]:
    """Labels on every runtime pod of one DisaggServing (no plan hash: see the module docstring)."""
    return {NAME: APP_NAME, INSTANCE: instance_value(instance), MANAGED: MANAGED_BY}


def selector_labels(instance: str, component: str, shape: str | None = None) -> dict[str, str]:
    """The immutable pod selector of one workload; worker groups add their shape, so the workloads of
    two plans that run side by side during a rollout never select each other's pods."""
    labels = {NAME: APP_NAME, INSTANCE: instance_value(instance), COMPONENT: component}
    if shape is not None:
        labels[SHAPE] = shape
    return labels


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def owned_selector(instance: str) -> str:
    """Every child of one DisaggServing (all plan hashes)."""
    return selector_string({NAME: APP_NAME, INSTANCE: instance_value(instance), MANAGED: MANAGED_BY})


def managed_selector() -> str:
    """Every child of every DisaggServing (used by the orphan sweep)."""
    return selector_string({NAME: APP_NAME, MANAGED: MANAGED_BY})


def matches(labels: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    """Client-side re-check of an equality selector (cheap; guards against servers that ignore it)."""
    labels = labels or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def child_name(instance: str, component: str, *, limit: int = MAX_NAME) -> str:
    """`<instance>-<component>`: a DNS-1035 label of at most `limit` characters (63: a Service name) for any
    legal DisaggServing name; the instance part is shortened with a hash (`base_name`) where needed."""
    return f"{base_name(instance, limit - len(component) - 1)}-{component}"


def service_name(instance: str) -> str:
    """The router Service, the address clients use: the DisaggServing's own name where it is a valid one."""
    return base_name(instance, MAX_NAME)


def worker_name(instance: str, component: str, shape: str) -> str:
    """`<instance>-<component>-<shape>`: a worker group's StatefulSet and headless Service."""
    return child_name(instance, f"{component}-{shape}", limit=MAX_STATEFULSET_NAME)
