"""The internal token on a KV link: a challenge-response before the first control message.

On accept the prefill end sends MAGIC and a nonce; the decode end answers MAGIC, how many proofs
follow (one per token it knows, at most MAX_PRESENTED), the proofs `HMAC(token, "client" + both
nonces)` and its own nonce. The prefill end reads exactly that many bytes (a bounded, fixed-size read:
nothing of the link's protocol is parsed before), compares in constant time and closes the connection
on a mismatch; else it answers OK and `HMAC(token, "server" + both nonces)`, so the decode end knows it
pulls from a real prefill worker and not from an impostor pushing forged KV. The token never crosses
the wire.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from ..security.tokens import MAX_PRESENTED, InternalToken, proof, proof_matches
from .errors import KVChannelError, KVTimeout
from .framing import FramedStream

log = logging.getLogger(__name__)
MAGIC = b"DKVA\x01"
_NONCE = 32
_PROOF = 32
_OK, _REFUSED = b"\x01", b"\x00"
_CLIENT, _SERVER = b"disagg-kv-client", b"disagg-kv-server"


class KVAuthError(KVChannelError):
    """The other end of a KV link does not hold the deployment's internal token (or sent none)."""


async def _read(stream: FramedStream, n: int, what: str) -> bytes:
    try:
        return await asyncio.wait_for(stream.reader.readexactly(n), stream.timeout)
    except asyncio.TimeoutError as e:
        raise KVTimeout(f"no {what} from {stream.peer} within {stream.timeout:.1f}s") from e
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise KVAuthError(f"KV peer {stream.peer} closed the connection during the token check ({what})") from e


async def _write(stream: FramedStream, data: bytes) -> None:
    stream.writer.write(data)
    try:
        await asyncio.wait_for(stream.writer.drain(), stream.timeout)
    except (asyncio.TimeoutError, ConnectionError) as e:
        raise KVAuthError(f"KV peer {stream.peer} went away during the token check") from e


async def verify_client(stream: FramedStream, token: InternalToken) -> None:
    """Prefill end, first thing on a new connection; KVAuthError (after answering REFUSED) on a bad proof."""
    server_nonce = secrets.token_bytes(_NONCE)
    await _write(stream, MAGIC + server_nonce)
    head = await _read(stream, len(MAGIC) + 1, "token proof")
    count = head[-1]
    if head[:-1] != MAGIC or not 1 <= count <= MAX_PRESENTED:
        await _write(stream, _REFUSED)
        raise KVAuthError(f"KV client {stream.peer} sent no internal-token proof")
    body = await _read(stream, count * _PROOF + _NONCE, "token proof")
    presented, client_nonce = body[:-_NONCE], body[-_NONCE:]
    proofs = [presented[i:i + _PROOF] for i in range(0, len(presented), _PROOF)]
    matched = [t for t in token.tokens if proof_matches(proofs, [proof(t, _CLIENT, server_nonce, client_nonce)])]
    if not matched:
        await _write(stream, _REFUSED)
        raise KVAuthError(f"KV client {stream.peer} does not hold the internal token")
    await _write(stream, _OK + proof(matched[0], _SERVER, client_nonce, server_nonce))


async def prove_to_server(stream: FramedStream, token: InternalToken) -> None:
    """Decode end, first thing on a new connection; KVAuthError if refused or the server cannot prove itself."""
    hello = await _read(stream, len(MAGIC) + _NONCE, "token challenge")
    if hello[:len(MAGIC)] != MAGIC:
        raise KVAuthError(f"KV server {stream.peer} sent no token challenge; is it started without "
                          "--internal-token-file?")
    server_nonce, client_nonce = hello[len(MAGIC):], secrets.token_bytes(_NONCE)
    tokens = token.tokens
    proofs = b"".join(proof(t, _CLIENT, server_nonce, client_nonce) for t in tokens)
    await _write(stream, MAGIC + bytes([len(tokens)]) + proofs + client_nonce)
    verdict = await _read(stream, 1, "token verdict")
    if verdict != _OK:
        raise KVAuthError(f"KV server {stream.peer} refused this worker's internal token")
    server_proof = await _read(stream, _PROOF, "server token proof")
    if not proof_matches([server_proof], [proof(t, _SERVER, client_nonce, server_nonce) for t in tokens]):
        raise KVAuthError(f"KV server {stream.peer} does not hold the internal token (an impostor?)")
