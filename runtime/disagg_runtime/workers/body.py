"""Reading a request body whole, bounded in size, time and encoding (router and workers alike).

`StreamReader.read(n)` returns what is buffered, not `n` bytes, so a large or slowly sent body arrives
short; this reads to the end. aiohttp's server inflates gzip/deflate bodies itself, chunk by chunk with a
bounded output per chunk, so counting the inflated bytes against the limit keeps a zip bomb to the limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestPayloadError

# What aiohttp decodes for us; anything else would reach the JSON parser still encoded.
DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


@dataclass(frozen=True)
class BodyLimits:
    """How much a body may be (after decoding) and how long its sender may take."""

    max_bytes: int = 4 << 20
    idle_timeout_s: float = 30.0  # longest pause between two pieces of the body
    total_timeout_s: float = 120.0  # the whole body, so a trickle cannot hold a connection forever


class BodyError(Exception):
    """The body cannot be read; `status` is 400, 408, 413 or 415 and the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _encoding(request: web.Request) -> str:
    return request.headers.get("Content-Encoding", "").strip().lower()


async def read_whole_body(request: web.Request, limits: BodyLimits) -> bytes:
    """Every byte of the (decoded) body; BodyError if it is too large, too slow, cut short or encoded oddly."""
    encoding = _encoding(request)
    if encoding not in DECODED_ENCODINGS:
        raise BodyError(415, f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate")
    declared = request.content_length
    if encoding in ("", "identity") and declared is not None and declared > limits.max_bytes:
        raise BodyError(413, f"request body is {declared} bytes; the limit is {limits.max_bytes}")
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + limits.total_timeout_s
    try:
        while True:
            wait = min(limits.idle_timeout_s, end - loop.time())
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(request.content.readany(), wait)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise BodyError(413, f"request body exceeds the limit of {limits.max_bytes} bytes"
                                     + (" after decoding" if encoding not in ("", "identity") else ""))
            chunks.append(chunk)
    except asyncio.TimeoutError as e:
        raise BodyError(408, f"the request body was not received in time ({size} bytes read; idle limit "
                             f"{limits.idle_timeout_s:g}s, total {limits.total_timeout_s:g}s)") from e
    except (RequestPayloadError, HttpProcessingError, ConnectionError) as e:
        raise BodyError(400, f"the request body is incomplete or not validly encoded: {e}") from e
    except HTTPException as e:  # aiohttp's own 413 (client_max_size) when something else read first
        raise BodyError(e.status, e.reason) from e
    return b"".join(chunks)
