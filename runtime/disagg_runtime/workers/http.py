"""HTTP plumbing shared by the workers: bounded JSON bodies, error replies, NDJSON streams with heartbeats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .body import BodyError, BodyLimits, read_whole_body
from .errors import error_body
from .protocol import Heartbeat

M = TypeVar("M", bound=BaseModel)
NDJSON = "application/x-ndjson"


def error_response(status: int, message: str, *, type_: str = "invalid_request_error",
                   headers: dict[str, str] | None = None, param: str | None = None) -> web.Response:
    """An OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    return web.json_response(error_body(status, message, type_=type_, param=param), status=status, headers=headers)


class BadRequest(Exception):
    """The request cannot be served as sent; `response` is the 4xx (400 unless `status` says) to send."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.response = error_response(status, message, param=param)


async def read_body(request: web.Request, limits: BodyLimits | int) -> bytes:
    """The whole body (`limits`, or a byte limit with default timeouts); BadRequest with 400/408/413/415."""
    if isinstance(limits, int):
        limits = BodyLimits(max_bytes=limits)
    try:
        return await read_whole_body(request, limits)
    except BodyError as e:
        refusal = BadRequest(str(e), status=e.status)
        refusal.response.force_close()  # the rest of the body is unread or unreadable: no keep-alive after it
        raise refusal from e


async def read_model(request: web.Request, model: type[M], limits: BodyLimits | int) -> M:
    """Parse and validate the body as `model`; BadRequest names the offending field."""
    data = await read_body(request, limits)
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}") from e


async def stream_ndjson(request: web.Request, events: AsyncIterator[BaseModel], *,
                        heartbeat_s: float) -> web.StreamResponse:
    """Send each event as a JSON line; a heartbeat line whenever `heartbeat_s` passes without one."""
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    beat = (Heartbeat().model_dump_json() + "\n").encode()
    iterator = events.__aiter__()
    pending = asyncio.ensure_future(iterator.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=heartbeat_s)
            if not done:
                await response.write(beat)
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            await response.write((event.model_dump_json() + "\n").encode())
            pending = asyncio.ensure_future(iterator.__anext__())
    finally:
        if not pending.done():
            pending.cancel()
        elif not pending.cancelled():
            pending.exception()  # retrieved, so a peer that hung up early leaves no "never retrieved" noise
    await response.write_eof()
    return response


def json_line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
