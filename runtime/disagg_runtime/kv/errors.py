"""Errors raised while moving KV caches between instances; all carry the request id where one exists."""

from __future__ import annotations

from .payload import KVMismatchError


class KVChannelError(RuntimeError):
    """A KV link failed (peer gone, protocol violation, unusable channel kind)."""


class KVPeerClosed(KVChannelError):
    """The other end closed or reset the connection (it died, restarted, or dropped an idle link)."""


class KVTimeout(KVChannelError, TimeoutError):
    """A KV transfer step did not complete within the channel's timeout."""


class KVNotFound(KVChannelError, LookupError):
    """The prefill side holds no KV for the requested id (never prefilled, expired, or already pulled)."""


class KVForbidden(KVChannelError, PermissionError):
    """A pull without the ticket the prefill worker issued with that request's KV (the link stays usable)."""


class DirectReadUnavailable(KVChannelError):
    """A direct read cannot be made on this link (not an IPC link, or the arena is gone): pull instead."""


__all__ = ["DirectReadUnavailable", "KVChannelError", "KVForbidden", "KVMismatchError", "KVNotFound", "KVPeerClosed", "KVTimeout"]
