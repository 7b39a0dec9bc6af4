"""The internal-token Secret of one DisaggServing: created, owned and rotated by the operator.

The Secret `<name>-internal-token` holds `tokens`: the current token, then (after a rotation) the
previous one, one a line. It is a child like the others (applied with them, before the pods that mount
it, and left alone while unchanged), but its content comes from the live copy: a new token is issued
only when there is none or when `spec.internalToken.rotation` differs from the rotation it was issued
for (its `disagg.io/token-rotation` annotation). Then the fresh token becomes current and the old
current one stays as previous, so pods that have not restarted yet still talk to the new ones
(security/tokens.py in the runtime). The token's version, a digest of the
current token, goes into the pod templates (credentials.py), which rolls the pods.

The token itself is never logged, never in the status and never in an Event.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

from . import labels as lb
from .credentials import TOKEN_KEY, TokenRef
from .errors import RenderError
from .kube import KINDS, KubeClient
from .render import Owner

ROTATION_ANNOTATION = "disagg.io/token-rotation"
SECRET = KINDS["Secret"]


def token_secret_name(instance: str) -> str:
    return lb.child_name(instance, "internal-token")


def token_version(token: str) -> str:
    """What the pod templates carry: reveals nothing about the token, changes with it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def stored_tokens(secret: Mapping[str, Any] | None) -> list[str]:
    """The tokens a live Secret holds, current first; [] when there is none or it is unreadable."""
    raw = ((secret or {}).get("data") or {}).get(TOKEN_KEY)
    if not raw:
        return []
    try:
        text = base64.b64decode(raw).decode()
    except (ValueError, UnicodeDecodeError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def token_secret(owner: Owner, plan_hash: str, rotation: int, tokens: list[str]) -> dict[str, Any]:
    """The Secret object holding `tokens` (current first), issued for `rotation`."""
    labels = {**lb.common_labels(owner.name, plan_hash), lb.COMPONENT: "internal-token"}
    data = base64.b64encode("".join(t + "\n" for t in tokens).encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": token_secret_name(owner.name), "namespace": owner.namespace, "labels": labels,
                         "annotations": {ROTATION_ANNOTATION: str(rotation)},
                         "ownerReferences": [owner.reference()]},
            "data": {TOKEN_KEY: data}}


def _foreign(secret: Mapping[str, Any], owner: Owner) -> bool:
    for ref in secret.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and (ref.get("uid") != owner.uid if owner.uid and ref.get("uid")
                                      else ref.get("name") != owner.name):
            return True
    return False


async def desired_token_secret(kube: KubeClient, owner: Owner, plan_hash: str,
                               rotation: int) -> tuple[dict[str, Any], TokenRef]:
    """The token Secret as `rotation` wants it (the live tokens, or a fresh one), and its reference."""
    name = token_secret_name(owner.name)
    live = await kube.get(SECRET, owner.namespace, name)
    if live is not None and _foreign(live, owner):
        raise RenderError(f"Secret {name} belongs to another controller; delete or rename it so this "
                          "DisaggServing can keep its internal token there")
    tokens = stored_tokens(live)
    issued_for = ((live or {}).get("metadata", {}).get("annotations") or {}).get(ROTATION_ANNOTATION)
    if not tokens or issued_for != str(rotation):
        tokens = [secrets.token_urlsafe(32), *tokens[:1]]
    return token_secret(owner, plan_hash, rotation, tokens), TokenRef(name, token_version(tokens[0]), rotation)
