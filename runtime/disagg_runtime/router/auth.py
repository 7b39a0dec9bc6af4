"""API keys at the router: `Authorization: Bearer <key>` (what OpenAI clients send) or `x-api-key`.

Keys come from a file (a mounted Secret: one key a line), re-read when it changes, so keys are issued
and revoked without a restart. A request without a valid key gets 401 with OpenAI's error envelope,
before its body is read. Keys are compared in constant time (security/tokens.py) and never logged:
the router keeps no access log and this module logs only the peer and the path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..security.secret_file import SecretFile
from ..security.tokens import matches_any

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def presented_key(request: web.Request) -> str | None:
    """The key a request carries, if any."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def unauthorized(message: str) -> web.Response:
    """OpenAI's answer to a missing or wrong key: 401, type invalid_request_error, code invalid_api_key."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Bearer realm="disagg"',
                                                         "Connection": "close"})


def api_key_middleware(keys: SecretFile, *, protect_metrics: bool = False):
    """Require a key on every route but the probes (and /metrics unless `protect_metrics`)."""
    open_paths = PROBE_PATHS if protect_metrics else PROBE_PATHS | {"/metrics"}

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        key = presented_key(request)
        if key is None:
            return unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        if not matches_any([key], keys.digests):
            log.warning("refused %s %s from %s: unknown API key", request.method, request.path, request.remote)
            return unauthorized("Incorrect API key provided.")
        return await handler(request)

    return check
