"""The internal token: its HTTP header, what a process presents and accepts, and the KV link's proofs.

Comparisons are constant-time (compare.py). The internal token file lists the current token first, then the previous one while a rotation rolls
out. A process presents every token it knows and accepts every token it knows: an old pod (previous
token only) and a new pod (both) then talk to each other in either direction, so a rotation needs no
ordering between the pods that restart.
"""

from __future__ import annotations

import hashlib
import hmac

from .compare import matches_any, proof_matches, secret_digest
from .secret_file import SecretFile

__all__ = ["INTERNAL_TOKEN_HEADER", "MAX_PRESENTED", "InternalToken", "matches_any", "proof", "proof_matches",
           "secret_digest"]

INTERNAL_TOKEN_HEADER = "X-Disagg-Internal-Token"
# Presented tokens per request; more is a confused or hostile peer, refused without comparing.
MAX_PRESENTED = 4


class InternalToken:
    """The per-deployment shared token of the router, the workers and the KV links."""

    def __init__(self, source: SecretFile) -> None:
        self.source = source

    @classmethod
    def from_file(cls, path: str, *, poll_s: float = 2.0) -> InternalToken:
        return cls(SecretFile(path, what="internal token", poll_s=poll_s))

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.source.values[:MAX_PRESENTED]

    def header_value(self) -> str:
        """What a client sends in `INTERNAL_TOKEN_HEADER` (tokens are URL-safe: no commas)."""
        return ",".join(self.tokens)

    def accepts_header(self, value: str | None) -> bool:
        if not value:
            return False
        presented = [v.strip() for v in value.split(",")]
        if len(presented) > MAX_PRESENTED:
            return False
        return matches_any(presented, self.source.digests[:MAX_PRESENTED])


def proof(token: str, label: bytes, *nonces: bytes) -> bytes:
    """HMAC-SHA256 of `label` and `nonces` under `token`: proves holding the token without sending it."""
    return hmac.new(token.encode(), label + b"".join(nonces), hashlib.sha256).digest()
