"""The worker's side of the token relay: one long-lived stream per router connection, one frame per step.

A router opens `GET /relay?id=<relay id>` once per worker and keeps it; requests it then submits (POST
/decode, POST /generate) name that relay id, and every token of theirs goes out on that stream. The engine
thread hands one list of step outputs to the event loop, which appends each token to its connection's
pending frame (a dict lookup and two appends); the connection's writer sends the pending frame as one
NDJSON line and starts a new one. While a write waits on the socket, later steps merge into the pending
frame, so a slow router connection gets fewer, larger frames instead of an unbounded queue.

Lines (all JSON objects, one per line):
  {"type": "hello", "relay": ID}                         first, once the worker knows the connection
  {"type": "step", "tokens": {RID: [[token ids], [text of each], finish_reason | null], ...},
                   "errors": {RID: [code, message], ...}} tokens since the last frame; "errors" only if any
  {"type": "heartbeat"}                                  nothing to send for `heartbeat_s`
A request is done after the entry whose finish_reason is not null, or its error. When the stream ends
(the router went away, or the worker stops) the worker aborts the connection's unfinished requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from .http import NDJSON, error_response

log = logging.getLogger(__name__)
MAX_RELAY_ID = 128
_HEARTBEAT = b'{"type":"heartbeat"}\n'


class TokenSink(Protocol):
    """Where a request's tokens go (its relay connection, or a recorder in a test harness)."""

    def token(self, request_id: str, token_id: int, text: str, finish_reason: str | None) -> None:
        """One new token; `finish_reason` is set on the request's last one."""

    def error(self, request_id: str, code: int, message: str) -> None:
        """The request failed; nothing follows."""


@dataclass
class TokenLog:
    """A sink that keeps what it is sent, per request (harnesses that step a worker by hand)."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    errors: dict[str, tuple[int, str]] = field(default_factory=dict)

    def token(self, request_id: str, token_id: int, text: str, finish_reason: str | None) -> None:
        self.tokens.setdefault(request_id, []).append(token_id)
        if finish_reason is not None:
            self.finished[request_id] = finish_reason

    def error(self, request_id: str, code: int, message: str) -> None:
        self.errors[request_id] = (code, message)


class RelayConnection:
    """One router's stream: the frame being gathered and a writer that sends it when there is one."""

    def __init__(self, relay_id: str) -> None:
        self.id = relay_id
        self._tokens: dict[str, list] = {}  # request id -> [token ids, their texts, finish_reason]
        self._errors: dict[str, list] = {}
        self._ready = asyncio.Event()
        self.closed = False

    def token(self, request_id: str, token_id: int, text: str, finish_reason: str | None) -> None:
        entry = self._tokens.get(request_id)
        if entry is None:
            self._tokens[request_id] = [[token_id], [text], finish_reason]
        else:  # the previous frame is still being written: merge into the pending one
            entry[0].append(token_id)
            entry[1].append(text)
            entry[2] = finish_reason
        if not self._ready.is_set():
            self._ready.set()

    def error(self, request_id: str, code: int, message: str) -> None:
        self._errors[request_id] = [code, message]
        if not self._ready.is_set():
            self._ready.set()

    def close(self) -> None:
        """Send what is pending, then end the stream."""
        self.closed = True
        self._ready.set()

    def take_frame(self) -> bytes | None:
        """The pending frame as one NDJSON line (and a new, empty one); None if nothing is pending."""
        if not self._tokens and not self._errors:
            return None
        frame: dict = {"type": "step", "tokens": self._tokens}
        if self._errors:
            frame["errors"] = self._errors
        self._tokens, self._errors = {}, {}
        # ensure_ascii=False: text stays UTF-8 on the wire, not \u escapes up to 6x its size
        return (json.dumps(frame, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    async def serve(self, response: web.StreamResponse, heartbeat_s: float) -> None:
        """Write frames as they fill, heartbeats in between, until closed (or the write fails)."""
        await response.write((json.dumps({"type": "hello", "relay": self.id}) + "\n").encode())
        while True:
            if not self._ready.is_set():
                try:
                    await asyncio.wait_for(self._ready.wait(), heartbeat_s)
                except asyncio.TimeoutError:
                    await response.write(_HEARTBEAT)
                    continue
            self._ready.clear()
            data = self.take_frame()
            if data is not None:
                await response.write(data)
            if self.closed:
                return


class RelayHub:
    """The worker's open relay connections, by id; `on_closed` runs when one ends (to abort its requests)."""

    def __init__(self, heartbeat_s: float, on_closed: Callable[[RelayConnection], None]) -> None:
        self.heartbeat_s = heartbeat_s
        self.connections: dict[str, RelayConnection] = {}
        self._on_closed = on_closed

    def get(self, relay_id: str) -> RelayConnection | None:
        return self.connections.get(relay_id)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        """GET /relay?id=ID: the connection's stream, for as long as the router keeps it."""
        relay_id = request.query.get("id", "")
        if not 0 < len(relay_id) <= MAX_RELAY_ID:
            return error_response(400, f"query parameter id must be 1-{MAX_RELAY_ID} characters")
        if relay_id in self.connections:
            return error_response(409, f"relay connection {relay_id} is already open")
        conn = RelayConnection(relay_id)
        self.connections[relay_id] = conn
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await conn.serve(response, self.heartbeat_s)
            await response.write_eof()
        except ConnectionError:
            # The router went away (or closed the stream as it shut down): nothing is left to write to.
            log.info("relay connection %s closed by the router", relay_id)
        except asyncio.CancelledError:
            log.info("relay connection %s closed by the router", relay_id)
            raise
        finally:
            del self.connections[relay_id]
            conn.closed = True
            self._on_closed(conn)
        return response

    async def close(self, _app: web.Application | None = None) -> None:
        """End every stream after its pending frame (on shutdown: aiohttp waits for open handlers)."""
        for conn in list(self.connections.values()):
            conn.close()
