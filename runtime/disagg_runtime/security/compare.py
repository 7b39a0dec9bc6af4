"""Secret comparison in constant time.

Presented and accepted values are both hashed to 32 bytes before `hmac.compare_digest`, so neither a
value's length nor which accepted value matches decides how long a comparison takes; every pair is
compared (no early exit).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence


def secret_digest(value: str) -> bytes:
    """The fixed-length form secrets are compared in (SecretFile keeps its values' digests)."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def matches_any(presented: Iterable[str], accepted: Sequence[bytes]) -> bool:
    """True if any presented value's digest equals any `accepted` digest; the time taken does not depend on
    where (or whether) they match."""
    ok = False
    for value in presented:
        got = secret_digest(value)
        for want in accepted:
            ok |= hmac.compare_digest(got, want)
    return ok


def proof_matches(presented: Sequence[bytes], expected: Sequence[bytes]) -> bool:
    """matches_any for fixed-length proofs (HMACs): every pair compared."""
    ok = False
    for got in presented:
        for want in expected:
            ok |= hmac.compare_digest(got, want)
    return ok
