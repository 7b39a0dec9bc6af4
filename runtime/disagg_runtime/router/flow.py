"""One request's path: prefill on one instance, then decode on another, relaying tokens as they arrive.

The router calls the prefill instance, which returns the first token and parks the KV (an NDJSON reply
with heartbeats, so a dead instance is noticed within `heartbeat_timeout_s` even if its TCP connection
lingers); it then submits the request to a decode instance, which answers at once and, once it has
pulled the KV, sends the tokens on the router's relay stream to that instance (router/relay.py). A
colocated instance, when the pool picks one, takes the request the same way and sends every token,
the first included, on its relay stream (no KV moves).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from pydantic import BaseModel, ValidationError

from ..workers.protocol import (
    Accepted,
    DecodeRequest,
    GenerateRequest,
    PrefillRequest,
    PrefillResult,
    SamplingSpec,
)
from .pool import NoWorkers, Worker, WorkerPool
from .relay import Chunk, RelayHub, RelayLink, TokenBuffer
from .upstream import CONNECT_ERRORS, NoResponse, UpstreamError, WorkerSilent, refusal

log = logging.getLogger(__name__)


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
            raise WorkerSilent(504, f"{who} sent nothing (not even a heartbeat) for {timeout:g}s") from e
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


class RequestFlow:
    """Runs one request; iterate `events()` for its tokens. `prompt_tokens` is known after the first."""

    def __init__(self, *, session: aiohttp.ClientSession, pool: WorkerPool, aborter: Aborter, relays: RelayHub,
                 request_id: str, prompt: str | None, prompt_ids: list[int] | None, sampling: SamplingSpec,
                 heartbeat_timeout_s: float = 10.0, response_timeout_s: float = 30.0) -> None:
        self.session = session
        self.pool = pool
        self.aborter = aborter
        self.relays = relays
        self.request_id = request_id
        self.prefill_msg = PrefillRequest(request_id=request_id, prompt=prompt, prompt_ids=prompt_ids,
                                          sampling=sampling)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.response_timeout_s = response_timeout_s
        self.prompt_tokens = 0
        self._prefill_worker: Worker | None = None  # or the colocated instance serving the whole request
        self._decode_worker: Worker | None = None
        self._link: RelayLink | None = None  # the relay stream carrying this request's tokens
        self._kv_parked = False
        self._done = False

    async def events(self) -> AsyncIterator[Chunk]:
        """First token from prefill, then the decode instance's tokens as they arrive; UpstreamError on failure."""
        try:
            entry = await self._enter()
            if isinstance(entry, PrefillResult):
                first = entry.first
                self.prompt_tokens = len(entry.prompt_ids)
                chunk = Chunk([first.token_id], [first.text], first.finish_reason if first.finished else None)
                if chunk.finished:
                    self._done = True
                    yield chunk
                    return
                # A decode instance takes the request before the client sees the first token: one that is
                # down, frozen or full fails the request with its own status, not a 200.
                tokens = await self._decode(entry)
                yield chunk
            else:
                tokens = entry
            while True:
                chunk = await tokens.next()
                self._kv_parked = False  # the decode instance holds the KV now
                if chunk.finished:
                    self._done = True
                yield chunk
                if chunk.finished:
                    return
        finally:
            if self._link is not None:
                self._link.close(self.request_id)
            if not self._done:
                self._abort_downstream()

    def _abort_downstream(self) -> None:
        if self._decode_worker is not None:
            self.aborter.abort(self._decode_worker.url, self.request_id)
        if self._prefill_worker is not None and (self._kv_parked or self._decode_worker is None):
            self.aborter.abort(self._prefill_worker.url, self.request_id)

    async def _enter(self) -> PrefillResult | TokenBuffer:
        """The first token from a prefill instance, or a colocated instance's buffer for every token."""
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
                    tokens, accepted = await self._submit(worker, "/generate", self._generate_msg)
                    self.prompt_tokens = accepted.prompt_tokens
                    return tokens
                return await self._prefill_on(worker)
            except (*CONNECT_ERRORS, NoResponse) as e:
                log.warning("%s instance %s unreachable: %s", worker.role, worker.url, e)
                self.pool.mark_failed(worker)
                if isinstance(e, NoResponse):  # it may hold the request: drop it there if it wakes up
                    self.aborter.abort(worker.url, self.request_id)
                self._prefill_worker = None
            except WorkerSilent:
                self.pool.mark_failed(worker)
                raise
            finally:
                worker.outstanding -= 1

    def _generate_msg(self, relay: str) -> GenerateRequest:
        return GenerateRequest(**self.prefill_msg.model_dump(), relay=relay)

    async def _submit(self, worker: Worker, path: str, message: Callable[[str], BaseModel]
                      ) -> tuple[TokenBuffer, Accepted]:
        """POST `message(relay id)` to `worker`; the buffer its tokens arrive in, once the worker took it."""
        link = await self.relays.link(worker)
        msg = message(link.id)
        tokens = link.open(self.request_id)  # before the POST: the first token may beat its answer
        who = f"{worker.role} instance {worker.url}"
        try:
            async with await self._post(worker, path, msg) as resp:
                if resp.status != 200:
                    raise await refusal(resp, who)
                try:
                    accepted = Accepted.model_validate_json(await resp.read())
                except ValidationError as e:
                    raise UpstreamError(502, f"{who} answered with an unexpected body: {e.errors()[0]['msg']}") from e
        except BaseException:
            link.close(self.request_id)
            raise
        self._link = link
        return tokens, accepted

    async def _post(self, worker: Worker, path: str, msg: BaseModel) -> aiohttp.ClientResponse:
        """POST `msg`; NoResponse if the worker sends no headers within `response_timeout_s` (frozen)."""
        # model_dump_json keeps non-ASCII text as is (json.dumps would escape it up to 6x past the body limit)
        request = self.session.post(f"{worker.url}{path}", data=msg.model_dump_json(),
                                    headers={"Content-Type": "application/json"})
        try:
            return await asyncio.wait_for(request, self.response_timeout_s)
        except asyncio.TimeoutError as e:
            raise NoResponse(f"{worker.role} instance {worker.url} sent no response in "
                             f"{self.response_timeout_s:g}s") from e

    async def _prefill_on(self, worker: Worker) -> PrefillResult:
        who = f"prefill instance {worker.url}"
        async with await self._post(worker, "/prefill", self.prefill_msg) as resp:
            if resp.status != 200:
                raise await refusal(resp, who)
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

    async def _decode(self, result: PrefillResult) -> TokenBuffer:
        """Hand the request to a decode instance (trying another if one is unreachable); its token buffer."""
        def message(relay: str) -> DecodeRequest:
            return DecodeRequest(request_id=self.request_id, prompt_ids=result.prompt_ids,
                                 sampling=self.prefill_msg.sampling, first_token_id=result.first.token_id,
                                 kv=result.kv, relay=relay)

        tokens = len(result.prompt_ids)  # decode admits by the prompt's KV; blocks for outputs come on demand
        tried: set[str] = set()
        while True:
            try:
                worker = self.pool.pick_decode(tokens, exclude=tried)
            except NoWorkers as e:
                raise UpstreamError(503, str(e)) from e
            tried.add(worker.url)
            self._decode_worker = worker
            try:
                buffer, _ = await self._submit(worker, "/decode", message)
                return buffer
            except WorkerSilent:
                self.pool.mark_failed(worker)
                raise
            except (*CONNECT_ERRORS, NoResponse) as e:
                self.pool.mark_failed(worker)
                if isinstance(e, NoResponse):
                    self.aborter.abort(worker.url, self.request_id)
                # Refused before it took the request: the KV is still parked, another instance can pull it.
                log.warning("decode instance %s unreachable, trying another: %s", worker.url, e)
                self._decode_worker = None
