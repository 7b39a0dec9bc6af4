"""Operator errors: each says what is wrong and what the user (or the cluster admin) can do."""

from __future__ import annotations


class OperatorError(Exception):
    """Base of every error the operator raises on purpose."""


class InvalidSpecError(OperatorError):
    """The DisaggServing spec failed validation; `fields` names the offending paths (camelCase)."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class RenderError(OperatorError):
    """A valid plan cannot be turned into Kubernetes objects (e.g. an instance larger than a node)."""


class KubeApiError(OperatorError):
    """The API server refused a request; `status` is the HTTP code (0 when unreachable)."""

    def __init__(self, status: int, reason: str, message: str, *, verb: str = "", path: str = "") -> None:
        super().__init__(f"{verb} {path}: {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.api_message = message

    @property
    def retriable(self) -> bool:
        """Conflicts, throttling, server errors and network failures heal by themselves."""
        return self.status in (0, 409, 429) or self.status >= 500


class ProfileError(OperatorError):
    """The latency profile `spec.profile` names cannot be used; `reason` is the Degraded condition's reason.

    Unlike an invalid spec, this heals without a spec change (the ConfigMap is created or fixed), so the
    operator keeps retrying.
    """

    reason = "ProfileUnusable"


class ProfileNotFoundError(ProfileError):
    """The ConfigMap, or the key in it, does not exist (yet)."""

    reason = "ProfileNotFound"


class InvalidProfileError(ProfileError):
    """The ConfigMap's value is not a LatencyProfile for this spec's model and GPU type."""

    reason = "InvalidProfile"
