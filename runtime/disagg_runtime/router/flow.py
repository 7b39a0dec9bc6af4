"""One request's path: prefill on one instance, then decode on another, relaying tokens as they arrive.

The router calls the prefill instance, which returns the first token and parks the KV; it then hands the
request to a decode instance, which pulls the KV when it has room and streams the rest. A colocated
instance, when the pool picks one, answers the same first message and then streams the rest itself (no
KV moves). Every reply is an NDJSON stream with heartbeats, so a dead instance is noticed within
`heartbeat_timeout_s` even if its TCP connection lingers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from pydantic import ValidationError

from ..workers.protocol import DecodeRequest, PrefillRequest, PrefillResult, SamplingSpec, TokenEvent
from .pool import NoWorkers, Worker, WorkerPool

log = logging.getLogger(__name__)
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)


class UpstreamError(Exception):
    """A worker refused or failed the request; `status` is what the client should see."""

    def __init__(self, status: int, message: str, *, type_: str = "server_error",
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.retry_after = retry_after


class Aborter:
    """Tells workers to drop a request, in the background (the caller may itself be cancelled)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._tasks: set[asyncio.Task] = set()

    def abort(self, worker_url: str, request_id: str) -> None:
        task = asyncio.create_task(self._post(worker_url, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, request_id: str) -> None:
        try:
            async with self.session.post(f"{url}/abort", json={"request_id": request_id},
                                         timeout=aiohttp.ClientTimeout(total=3)) as resp:
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass  # the worker is gone; its requests are gone with it

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _ndjson(resp: aiohttp.ClientResponse, timeout: float, who: str) -> AsyncIterator[dict]:
    """Non-heartbeat messages of a worker's NDJSON reply; UpstreamError when it goes silent or breaks."""
    while True:
        try:
            line = await asyncio.wait_for(resp.content.readline(), timeout)
        except asyncio.TimeoutError as e:
            raise UpstreamError(504, f"{who} sent nothing (not even a heartbeat) for {timeout:.0f}s") from e
        except (aiohttp.ClientError, ConnectionError) as e:
            raise UpstreamError(502, f"{who} failed mid-request: {type(e).__name__}: {e}") from e
        if not line:
            return
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            raise UpstreamError(502, f"{who} sent a malformed line") from e
        if msg.get("type") != "heartbeat":
            yield msg


async def _refusal(resp: aiohttp.ClientResponse, who: str) -> UpstreamError:
    try:
        message = (await resp.json())["error"]["message"]
    except (aiohttp.ContentTypeError, KeyError, TypeError, json.JSONDecodeError, aiohttp.ClientError):
        message = f"{who} answered HTTP {resp.status}"
    type_ = "invalid_request_error" if resp.status == 400 else "server_error"
    status = resp.status if resp.status in (400, 429, 503) else 502
    return UpstreamError(status, message, type_=type_, retry_after=resp.headers.get("Retry-After"))


class RequestFlow:
    """Runs one request; iterate `events()` for its tokens. `prompt_tokens` is known after the first."""

    def __init__(self, *, session: aiohttp.ClientSession, pool: WorkerPool, aborter: Aborter, request_id: str,
                 prompt: str | None, prompt_ids: list[int] | None, sampling: SamplingSpec,
                 heartbeat_timeout_s: float = 10.0) -> None:
        self.session = session
        self.pool = pool
        self.aborter = aborter
        self.request_id = request_id
        self.prefill_msg = PrefillRequest(request_id=request_id, prompt=prompt, prompt_ids=prompt_ids,
                                          sampling=sampling)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.prompt_tokens = 0
        self._prefill_worker: Worker | None = None  # or the colocated instance serving the whole request
        self._decode_worker: Worker | None = None
        self._kv_parked = False
        self._done = False

    async def events(self) -> AsyncIterator[TokenEvent]:
        """First token from prefill, then the decode instance's tokens; UpstreamError on failure."""
        rest: AsyncIterator[TokenEvent] | None = None
        try:
            result, rest = await self._prefill()
            self.prompt_tokens = len(result.prompt_ids)
            yield result.first
            if result.first.finished:
                self._done = True
                if rest is not None:
                    async for _ in rest:  # to the end of the colocated reply (a clean close, see below)
                        pass
                return
            if rest is None:
                rest, who = self._decode(result), "decode instance"
            else:
                who = f"colocated instance {self._prefill_worker.url}"
            async for event in rest:
                yield event
                if event.finished:
                    self._done = True
                    break
            if self._done:
                # Read the reply to its end, so the worker's stream closes cleanly (not reset under its write).
                async for _ in rest:
                    pass
                return
            if self._decode_worker is not None:
                who = f"decode instance {self._decode_worker.url}"
            raise UpstreamError(502, f"{who} ended the stream early")
        finally:
            if rest is not None:
                await rest.aclose()
            if not self._done:
                self._abort_downstream()

    def _abort_downstream(self) -> None:
        if self._decode_worker is not None:
            self.aborter.abort(self._decode_worker.url, self.request_id)
        if self._prefill_worker is not None and (self._kv_parked or self._decode_worker is None):
            self.aborter.abort(self._prefill_worker.url, self.request_id)

    async def _prefill(self) -> tuple[PrefillResult, AsyncIterator[TokenEvent] | None]:
        """The first token from a prefill or colocated instance; for a colocated one, also the rest of its stream."""
        tried: set[str] = set()
        while True:
            worker = self.pool.pick_entry()
            if worker.url in tried:
                raise UpstreamError(503, f"no {worker.role} instance is reachable")
            tried.add(worker.url)
            self._prefill_worker = worker
            worker.outstanding += 1
            try:
                if worker.role == "colocated":
                    return await self._generate_on(worker)
                return await self._prefill_on(worker), None
            except _CONNECT_ERRORS as e:
                log.warning("%s instance %s unreachable: %s", worker.role, worker.url, e)
                self.pool.mark_failed(worker)
                self._prefill_worker = None
            finally:
                worker.outstanding -= 1

    async def _generate_on(self, worker: Worker) -> tuple[PrefillResult, AsyncIterator[TokenEvent]]:
        stream = self._colocated_stream(worker)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise UpstreamError(502, f"colocated instance {worker.url} closed the stream before the first "
                                     "token") from None
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    async def _colocated_stream(self, worker: Worker) -> AsyncIterator:
        """A colocated instance's reply: its `prefilled` message (first token), then its TokenEvents."""
        who = f"colocated instance {worker.url}"
        async with self.session.post(f"{worker.url}/generate", json=self.prefill_msg.model_dump(mode="json")) as resp:
            if resp.status != 200:
                raise await _refusal(resp, who)
            first = True
            async for msg in _ndjson(resp, self.heartbeat_timeout_s, who):
                if msg.get("type") == "error":
                    raise UpstreamError(int(msg.get("code", 500)), f"{who}: {msg.get('message')}")
                try:
                    event = PrefillResult.model_validate(msg) if first else TokenEvent.model_validate(msg)
                except ValidationError as e:
                    raise UpstreamError(502, f"{who} sent an unexpected message: {e.errors()[0]['msg']}") from e
                first = False
                yield event

    async def _prefill_on(self, worker: Worker) -> PrefillResult:
        who = f"prefill instance {worker.url}"
        body = self.prefill_msg.model_dump(mode="json")
        async with self.session.post(f"{worker.url}/prefill", json=body) as resp:
            if resp.status != 200:
                raise await _refusal(resp, who)
            async for msg in _ndjson(resp, self.heartbeat_timeout_s, who):
                if msg.get("type") == "error":
                    raise UpstreamError(int(msg.get("code", 500)), str(msg.get("message")))
                try:
                    result = PrefillResult.model_validate(msg)
                except ValidationError as e:
                    raise UpstreamError(502, f"{who} sent an unexpected message: {e.errors()[0]['msg']}") from e
                if result.kv is not None and not result.kv.host:
                    # The prefill instance serves KV on the address the router reached it at.
                    result.kv = result.kv.model_copy(update={"host": worker.host})
                self._kv_parked = result.kv is not None
                return result
        raise UpstreamError(502, f"{who} closed the stream before the first token")

    async def _decode(self, result: PrefillResult) -> AsyncIterator[TokenEvent]:
        msg = DecodeRequest(request_id=self.request_id, prompt_ids=result.prompt_ids,
                            sampling=self.prefill_msg.sampling, first_token_id=result.first.token_id,
                            kv=result.kv)
        tokens = len(result.prompt_ids)  # decode admits by the prompt's KV; blocks for outputs come on demand
        tried: set[str] = set()
        while True:
            try:
                worker = self.pool.pick_decode(tokens, exclude=tried)
            except NoWorkers as e:
                raise UpstreamError(503, str(e)) from e
            tried.add(worker.url)
            self._decode_worker = worker
            who = f"decode instance {worker.url}"
            yielded = False
            try:
                async with self.session.post(f"{worker.url}/decode", json=msg.model_dump(mode="json")) as resp:
                    if resp.status != 200:
                        raise await _refusal(resp, who)
                    async for m in _ndjson(resp, self.heartbeat_timeout_s, who):
                        if m.get("type") == "error":
                            raise UpstreamError(int(m.get("code", 500)), f"{who}: {m.get('message')}")
                        self._kv_parked = False  # the decode instance holds the KV now
                        yielded = True
                        yield TokenEvent.model_validate(m)
                    return
            except _CONNECT_ERRORS as e:
                self.pool.mark_failed(worker)
                if yielded:
                    raise UpstreamError(502, f"{who} failed mid-stream: {e}") from e
                # Refused before it took the request: the KV is still parked, another instance can pull it.
                log.warning("%s unreachable, trying another: %s", who, e)
                self._decode_worker = None
