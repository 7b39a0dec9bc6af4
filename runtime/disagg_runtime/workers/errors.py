"""The OpenAI error envelope on every error an aiohttp app sends, including aiohttp's own 404/405/413."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}


def error_type(status: int) -> str:
    """The envelope's `type` for an HTTP status (OpenAI's names)."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, *, type_: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": status}}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text HTTP errors and unexpected exceptions into JSON error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif e.status == 404:
            message = f"no route {request.method} {request.path}"
        else:
            message = e.reason
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(error_body(e.status, message), status=e.status, headers=headers)
    except ConnectionResetError:
        raise  # the client is gone; nothing to answer
    except Exception:  # noqa: BLE001 - any bug still answers in the envelope; the traceback goes to the log
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return web.json_response(error_body(500, "internal error; see the server log"), status=500)
