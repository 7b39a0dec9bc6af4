"""HTTP plumbing shared by the workers: bounded JSON bodies, error replies, NDJSON streams with heartbeats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .protocol import Heartbeat

M = TypeVar("M", bound=BaseModel)
NDJSON = "application/x-ndjson"


def error_response(status: int, message: str, *, type_: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-style error body: {"error": {"message", "type", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class BadRequest(Exception):
    """The body is not a valid message; `response` is the 400 (or 413-as-400) to send."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = error_response(400, message)


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The body, refusing more than `max_bytes` without reading it all into memory."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BadRequest(f"request body is {request.content_length} bytes; the limit is {max_bytes}")
    data = await request.content.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadRequest(f"request body exceeds the limit of {max_bytes} bytes")
    return data


async def read_model(request: web.Request, model: type[M], max_bytes: int) -> M:
    """Parse and validate the body as `model`; BadRequest names the offending field."""
    data = await read_body(request, max_bytes)
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
