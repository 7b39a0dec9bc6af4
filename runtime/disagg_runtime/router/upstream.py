"""How a worker failed a request, as the router tells its client: the errors and the refusal reader."""

from __future__ import annotations

import json

import aiohttp

CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)


class UpstreamError(Exception):
    """A worker refused or failed the request; `status` is what the client should see."""

    def __init__(self, status: int, message: str, *, type_: str = "server_error",
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.retry_after = retry_after


class WorkerSilent(UpstreamError):
    """A worker sent nothing, not even a heartbeat, for too long: frozen or cut off (504)."""


class NoResponse(Exception):
    """A worker accepted the connection but sent no response headers in time (a stopped process)."""


async def refusal(resp: aiohttp.ClientResponse, who: str) -> UpstreamError:
    """The error a worker's non-200 answer means for the client: 400, 429 and 503 pass through, else 502."""
    try:
        message = (await resp.json())["error"]["message"]
    except (aiohttp.ContentTypeError, KeyError, TypeError, json.JSONDecodeError, aiohttp.ClientError):
        message = f"{who} answered HTTP {resp.status}"
    type_ = "invalid_request_error" if resp.status == 400 else "server_error"
    status = resp.status if resp.status in (400, 429, 503) else 502
    return UpstreamError(status, message, type_=type_, retry_after=resp.headers.get("Retry-After"))
