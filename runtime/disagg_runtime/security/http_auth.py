"""aiohttp middleware and client hook for the internal token on the workers' HTTP ports."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .tokens import INTERNAL_TOKEN_HEADER, InternalToken

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Kubelet probes carry no credentials and a scrape needs none (the NetworkPolicy limits who reaches it);
# none of them takes a body or reveals a request.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def internal_auth_middleware(token: InternalToken, *, open_paths: frozenset[str] = OPEN_PATHS):
    """403 before the handler (and before any of the body is read) unless the request carries the token."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or token.accepts_header(request.headers.get(INTERNAL_TOKEN_HEADER)):
            return await handler(request)
        log.warning("refused %s %s from %s: no valid internal token", request.method, request.path, request.remote)
        body = {"error": {"message": f"this port serves the deployment's router only; send {INTERNAL_TOKEN_HEADER}",
                          "type": "permission_error", "param": None, "code": 403}}
        # Close the connection: an unread body must not be parsed as the next request.
        return web.json_response(body, status=403, headers={"Connection": "close"})

    return check


def internal_token_client_middleware(token: InternalToken):
    """aiohttp client middleware: every request of the session carries the token (re-read on rotation)."""

    async def add(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        request.headers[INTERNAL_TOKEN_HEADER] = token.header_value()
        return await handler(request)

    return add
