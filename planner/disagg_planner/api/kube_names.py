"""Kubernetes' grammars for names, label keys and values, resource names and image references.

Plain regular expressions (the planner imports no Kubernetes client), checked where the spec is parsed, so
a value a real API server would refuse is an invalid spec naming its field, not a half-applied rollout.
"""

from __future__ import annotations

import re

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(rf"^{_DNS_LABEL}$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# docker/distribution's reference grammar: [domain[:port]/]path[:tag][@digest]
_DOMAIN = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and bool(DNS1123_LABEL.match(value))


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and bool(DNS1035_LABEL.match(value))


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(DNS1123_SUBDOMAIN.match(value))


def qualified_name_error(value: str) -> str | None:
    """Why `value` is not a qualified name ([prefix/]name: label keys, toleration keys, resource names)."""
    prefix, slash, name = value.rpartition("/")
    if slash and not prefix:
        return f"{value!r} has an empty prefix before '/'"
    if slash and not is_dns1123_subdomain(prefix):
        return f"prefix {prefix!r} of {value!r} is not a DNS-1123 subdomain (lowercase letters, digits, '-', '.')"
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (f"{value!r}: the name part must be 1-63 characters of letters, digits, '-', '_' or '.', starting "
                "and ending with a letter or digit")
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a label value (also what nodeSelector values must be)."""
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (f"{value!r} is not a label value: at most 63 characters of letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def extended_resource_error(value: str) -> str | None:
    """Why `value` cannot name an extended resource a container requests (e.g. nvidia.com/gpu)."""
    problem = qualified_name_error(value)
    if problem:
        return problem
    prefix = value.rpartition("/")[0]
    if not prefix:
        return f"{value!r} needs a domain prefix, as in nvidia.com/gpu"
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io") or value.startswith("requests."):
        return f"{value!r} is in a namespace reserved for Kubernetes' own resources"
    return None


def image_error(value: str) -> str | None:
    """Why `value` is not a container image reference."""
    if not IMAGE_REFERENCE.match(value):
        return (f"{value!r} is not an image reference ([registry[:port]/]path[:tag][@digest], lowercase path, "
                "no spaces)")
    return None
