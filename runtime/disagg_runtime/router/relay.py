"""The router's side of the token relay: one long-lived stream per decode/colocated instance, demultiplexed.

`RelayHub.link(worker)` opens (once, shared by every request to that instance) `GET /relay?id=ID` and
starts one reader task, which parses each frame (one per engine step, carrying every request's new
tokens; workers/relay.py has the format) and appends each request's tokens to its `TokenBuffer`: an
append and an event set, never a wait on a client. Each client's handler drains its own buffer, so a
client that reads slowly only lets its own buffer grow (past `coalesce_after_tokens` its text is joined
into one piece, which reaches the client as one event; past `max_buffered_tokens` that one request ends
with an error and is aborted on the worker); the reader and the other streams go on. When the stream breaks or goes silent for `heartbeat_timeout_s`, every request
on it ends with an error and the instance is marked down. A link to an instance the pool no longer lists
(a re-plan removed it) is closed once it carries no request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from .pool import Worker
from .upstream import NoResponse, UpstreamError, WorkerSilent, refusal

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Tokens of one request that reached the router together (one or more engine steps' worth).

    `texts` has each token's text, or, when the client fell behind and the buffer joined them, fewer pieces.
    """

    token_ids: list[int]
    texts: list[str]
    finish_reason: str | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.texts)


class TokenBuffer:
    """One request's tokens between the relay reader (`push`, `fail`) and its client's handler (`next`)."""

    __slots__ = ("_ids", "_texts", "_reason", "_error", "_ready", "_coalesce_after")

    def __init__(self, coalesce_after: int) -> None:
        self._coalesce_after = coalesce_after
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._reason: str | None = None
        self._error: UpstreamError | None = None
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._ids)

    def push(self, token_ids: list[int], texts: list[str], finish_reason: str | None) -> None:
        self._ids += token_ids
        self._texts += texts
        if len(self._texts) > self._coalesce_after:  # a client that is behind: one string, not one per token
            self._texts = ["".join(self._texts)]
        self._reason = finish_reason
        self._ready.set()

    def fail(self, error: UpstreamError) -> None:
        """End the request with `error`, after the tokens already buffered."""
        if self._error is None:
            self._error = error
        self._ready.set()

    async def next(self) -> Chunk:
        """Everything buffered since the last call (waits for at least one token); the error once drained."""
        while not self._ids:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        chunk = Chunk(self._ids, self._texts, self._reason)
        self._ids, self._texts = [], []
        return chunk


class RelayLink:
    """One open relay stream to one instance and the buffers of the requests whose tokens it carries."""

    def __init__(self, worker: Worker, relay_id: str, response: aiohttp.ClientResponse, hub: RelayHub) -> None:
        self.worker = worker
        self.id = relay_id
        self.who = f"{worker.role} instance {worker.url}"
        self.alive = True
        self._response = response
        self._streams: dict[str, TokenBuffer] = {}
        self._hub = hub  # its limits, and what to tell it (overflow, death); it created this link
        self._reader = asyncio.create_task(self._read(), name=f"relay {worker.url}")

    def open(self, request_id: str) -> TokenBuffer:
        """A buffer for a request about to be submitted on this link (before, so no token can be missed)."""
        if not self.alive:
            raise UpstreamError(502, f"{self.who} failed mid-request: its relay stream is closed")
        buffer = self._streams[request_id] = TokenBuffer(self._hub.coalesce_after_tokens)
        return buffer

    def close(self, request_id: str) -> None:
        """Stop buffering for a request (done, refused, or its client left)."""
        self._streams.pop(request_id, None)

    async def _read(self) -> None:
        error = UpstreamError(502, f"{self.who} failed mid-request: the router's relay reader failed")
        try:
            while True:
                line = await asyncio.wait_for(self._response.content.readline(), self._hub.heartbeat_timeout_s)
                if not line:
                    error = UpstreamError(502, f"{self.who} failed mid-request: it closed its relay stream")
                    return
                self._frame(json.loads(line))
                if not self._streams and not self._hub.listed(self.worker):  # gone from the endpoints: let go
                    error = UpstreamError(503, f"{self.who} is no longer listed")
                    return
        except asyncio.TimeoutError:
            error = WorkerSilent(504, f"{self.who} sent nothing (not even a heartbeat) for {self._hub.heartbeat_timeout_s:g}s")
        except (aiohttp.ClientError, ConnectionError) as e:
            error = UpstreamError(502, f"{self.who} failed mid-request: {type(e).__name__}: {e}")
        except (ValueError, TypeError, AttributeError) as e:
            error = UpstreamError(502, f"{self.who} sent a malformed relay frame: {e}")
        except asyncio.CancelledError:
            error = UpstreamError(503, "the router is shutting down")
            raise
        finally:
            self._die(error)

    def _frame(self, frame: dict) -> None:
        streams = self._streams
        tokens = frame.get("tokens")
        if tokens:
            for rid, (ids, texts, reason) in tokens.items():
                buffer = streams.get(rid)
                if buffer is None:  # aborted, or its client left
                    continue
                buffer.push(ids, texts, reason)
                if reason is not None:
                    del streams[rid]
                elif len(buffer) > self._hub.max_buffered_tokens:
                    del streams[rid]
                    buffer.fail(UpstreamError(500, f"the client fell {len(buffer)} tokens behind this stream; "
                                                   "it was ended so the others go on"))
                    self._hub.link_overflowed(self.worker, rid)
        errors = frame.get("errors")
        if errors:
            for rid, (code, message) in errors.items():
                buffer = streams.pop(rid, None)
                if buffer is not None:
                    buffer.fail(UpstreamError(int(code), f"{self.who}: {message}"))

    def _die(self, error: UpstreamError) -> None:
        self.alive = False
        self._response.close()
        streams, self._streams = self._streams, {}
        for buffer in streams.values():
            buffer.fail(error)
        self._hub.link_died(self, error)

    async def close_all(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class RelayHub:
    """The router's relay links, one per instance URL, opened on first use and reopened after a failure."""

    def __init__(self, session: aiohttp.ClientSession, *, heartbeat_timeout_s: float, response_timeout_s: float,
                 max_buffered_tokens: int, coalesce_after_tokens: int, abort: Callable[[str, str], None],
                 mark_failed: Callable[[Worker], None], listed: Callable[[Worker], bool]) -> None:
        self.session = session
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.response_timeout_s = response_timeout_s
        self.max_buffered_tokens = max_buffered_tokens
        self.coalesce_after_tokens = coalesce_after_tokens
        self._abort = abort
        self._mark_failed = mark_failed
        self.listed = listed  # whether the pool still lists a worker
        self.links: dict[str, RelayLink] = {}
        self._opening: dict[str, asyncio.Task[RelayLink]] = {}

    async def link(self, worker: Worker) -> RelayLink:
        """The open link to `worker`, opening it if needed; connection errors, NoResponse or UpstreamError."""
        link = self.links.get(worker.url)
        if link is not None and link.alive:
            return link
        task = self._opening.get(worker.url)
        if task is None:
            task = self._opening[worker.url] = asyncio.create_task(self._open(worker))
            task.add_done_callback(lambda _t, url=worker.url: self._opening.pop(url, None))
        # Shielded: one request's client leaving must not cancel the link other requests wait for.
        return await asyncio.shield(task)

    async def _open(self, worker: Worker) -> RelayLink:
        who = f"{worker.role} instance {worker.url}"
        relay_id = uuid.uuid4().hex
        request = self.session.get(f"{worker.url}/relay", params={"id": relay_id})
        try:
            response = await asyncio.wait_for(request, self.response_timeout_s)
        except asyncio.TimeoutError as e:
            raise NoResponse(f"{who} sent no response in {self.response_timeout_s:g}s") from e
        try:
            if response.status != 200:
                raise await refusal(response, who)
            hello = json.loads(await asyncio.wait_for(response.content.readline(), self.response_timeout_s))
            if hello.get("type") != "hello" or hello.get("relay") != relay_id:
                raise UpstreamError(502, f"{who} opened its relay stream with {hello!r}")
        except asyncio.TimeoutError as e:
            response.close()
            raise NoResponse(f"{who} opened no relay stream in {self.response_timeout_s:g}s") from e
        except (ValueError, AttributeError) as e:
            response.close()
            raise UpstreamError(502, f"{who} opened its relay stream with a malformed line: {e}") from e
        except BaseException:
            response.close()
            raise
        link = RelayLink(worker, relay_id, response, self)
        self.links[worker.url] = link
        return link

    def link_overflowed(self, worker: Worker, request_id: str) -> None:
        log.warning("request %s: its client is not reading; ended and aborted on %s", request_id, worker.url)
        self._abort(worker.url, request_id)

    def link_died(self, link: RelayLink, error: UpstreamError) -> None:
        if self.links.get(link.worker.url) is link:
            del self.links[link.worker.url]
        if error.status in (502, 504):  # broken or silent: stop choosing it until it polls healthy
            log.warning("relay stream to %s ended: %s", link.worker.url, error)
            self._mark_failed(link.worker)

    async def close(self) -> None:
        """Close every link (router shutdown)."""
        for task in list(self._opening.values()):
            task.cancel()
        await asyncio.gather(*(link.close_all() for link in list(self.links.values())), return_exceptions=True)
