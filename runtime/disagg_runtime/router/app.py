"""The router's HTTP server: OpenAI-compatible completions and chat completions, streamed or not."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from ..chat_template import ChatRenderError, ChatTemplate
from ..metrics import Outcome, RequestMetrics, render
from ..security.http_auth import internal_token_client_middleware
from ..security.secret_file import SecretFile
from ..security.tokens import InternalToken
from ..workers.body import BodyLimits
from ..workers.errors import json_errors
from ..workers.http import BadRequest, error_response, read_body
from .auth import api_key_middleware
from .flow import Aborter, RequestFlow
from .openai import (
    ChatCompletionRequest,
    CompletionRequest,
    Kind,
    ResponseWriter,
    error_body,
    sse,
)
from .pool import NoCapacity, NoWorkers, WorkerPool
from .relay import Chunk, RelayHub
from .upstream import UpstreamError

# Lines of a worker's reply can carry a long prompt's token ids; aiohttp's default line limit is 128 KiB.
_READ_BUFSIZE = 4 << 20


@dataclass(frozen=True)
class RouterConfig:
    """Where the workers are and the router's own limits.

    `colocated` instances serve whole requests (both phases); a deployment has those, or prefill and
    decode instances, or both while a re-plan switches modes.
    """

    prefill: list[str]
    decode: list[str]
    colocated: list[str] = field(default_factory=list)
    endpoints_file: str | None = None
    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 30.0  # longest pause while a client sends its body (then 408)
    connect_timeout_s: float = 5.0  # to a worker
    response_timeout_s: float = 30.0  # a worker's response headers; beyond, it is marked down (frozen)
    poll_timeout_s: float = 2.0  # a worker's /stats
    max_in_flight: int = 4096
    default_chat_max_tokens: int = 256
    heartbeat_timeout_s: float = 10.0
    max_buffered_tokens: int = 65536  # tokens one stream may fall behind its client before it is ended
    coalesce_after_tokens: int = 256  # a client this far behind gets what piled up as one event
    poll_s: float = 0.5
    served_model_name: str | None = None
    drain_timeout_s: float = 300.0
    model_path: str | None = None  # read for the model's chat template only (workers hold the weights)
    api_key_file: str | None = None  # clients must send one of its keys (one a line)
    metrics_require_key: bool = False  # /metrics behind the API key too
    internal_token_file: str | None = None  # sent to the workers (which refuse requests without it)


def _outcome(status: int) -> Outcome:
    return {400: "invalid", 429: "rejected"}.get(status, "error")


class Router:
    """Holds the worker pool, the HTTP session to the workers and the request metrics."""

    def __init__(self, config: RouterConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = RequestMetrics.create(self.registry)
        self.chat_template = ChatTemplate.for_model(config.model_path)
        self.in_flight = 0
        self.draining = False
        self.drained = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.pool: WorkerPool | None = None
        self.aborter: Aborter | None = None
        self.relays: RelayHub | None = None
        self.api_keys = SecretFile(config.api_key_file, what="API key") if config.api_key_file else None
        self.token = InternalToken.from_file(config.internal_token_file) if config.internal_token_file else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes + 1, middlewares=[json_errors])
        for secret in (self.api_keys, self.token.source if self.token else None):
            if secret is not None:
                secret.attach(app)
        if self.api_keys is not None:
            app.middlewares.append(api_key_middleware(self.api_keys, protect_metrics=self.config.metrics_require_key))
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_handler)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        # No total timeout: streams are long; liveness comes from the workers' heartbeats instead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=0)
        middlewares = (internal_token_client_middleware(self.token),) if self.token else ()
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=_READ_BUFSIZE,
                                             middlewares=middlewares)
        self.pool = WorkerPool(self.session, prefill=self.config.prefill, decode=self.config.decode,
                               colocated=self.config.colocated, endpoints_file=self.config.endpoints_file, poll_s=self.config.poll_s,
                               poll_timeout_s=self.config.poll_timeout_s)
        self.aborter = Aborter(self.session)
        self.relays = RelayHub(self.session, heartbeat_timeout_s=self.config.heartbeat_timeout_s,
                               response_timeout_s=self.config.response_timeout_s,
                               max_buffered_tokens=self.config.max_buffered_tokens,
                               coalesce_after_tokens=self.config.coalesce_after_tokens, abort=self.aborter.abort,
                               mark_failed=self.pool.mark_failed,
                               listed=lambda w: self.pool.workers.get(w.url) is w)
        await self.pool.start()

    async def _stop(self, _app: web.Application) -> None:
        await self.pool.close()
        await self.relays.close()
        await self.aborter.wait()
        await self.session.close()

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or (self.pool.model_id if self.pool else None) or "disagg"

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        body = {role: len(self.pool.ready(role)) for role in ("prefill", "decode", "colocated")}
        body["draining"] = self.draining
        ready = self.pool.ready_to_serve and not self.draining
        return web.json_response(body, status=200 if ready else 503)

    def start_drain(self) -> None:
        """Refuse new requests (503) and set `drained` once the in-flight ones have finished."""
        self.draining = True
        if self.in_flight == 0:
            self.drained.set()
        else:  # streams that outlive the grace period are cut rather than holding the rollout
            asyncio.get_running_loop().call_later(self.config.drain_timeout_s, self.drained.set)

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        data, content_type = render(self.registry)
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def models(self, _request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "disagg",
                "max_model_len": self.pool.max_context, "chat_template": self.chat_template.source}
        return web.json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    @property
    def _body_limits(self) -> BodyLimits:
        return BodyLimits(max_bytes=self.config.max_body_bytes, idle_timeout_s=self.config.body_timeout_s,
                          total_timeout_s=4 * self.config.body_timeout_s)

    def _reject(self, status: int, message: str, *, type_: str, retry_after: str | None = None) -> web.Response:
        self.metrics.ended(_outcome(status))
        headers = {"Retry-After": retry_after} if retry_after else None
        return error_response(status, message, type_=type_, headers=headers)

    def _flow(self, kind: Kind, body: bytes) -> tuple[RequestFlow, CompletionRequest | ChatCompletionRequest]:
        """Parse the body into a flow and the request; BadRequest for anything a client must fix."""
        try:
            if kind == "completion":
                req = CompletionRequest.model_validate_json(body)
                prompt, prompt_ids = req.prompt_parts()
                max_tokens = req.max_tokens or 16
            else:
                req = ChatCompletionRequest.model_validate_json(body)
                messages = [{"role": m.role, "content": m.text} for m in req.messages]
                prompt, prompt_ids = self.chat_template.render(messages), None
                max_tokens = req.requested_max_tokens or self.config.default_chat_max_tokens
        except ChatRenderError as e:
            raise BadRequest(str(e)) from e
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise BadRequest(f"{where}: {first['msg']}", param=where) from e
        if req.model is not None and req.model not in (self.model_name, self.pool.model_id):
            raise BadRequest(f"the model `{req.model}` does not exist; this server serves `{self.model_name}`",
                             status=404, param="model")
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        flow = RequestFlow(session=self.session, pool=self.pool, aborter=self.aborter, relays=self.relays,
                           request_id=f"{prefix}-{uuid.uuid4().hex}", prompt=prompt, prompt_ids=prompt_ids,
                           sampling=req.sampling(max_tokens), heartbeat_timeout_s=self.config.heartbeat_timeout_s,
                           response_timeout_s=self.config.response_timeout_s)
        return flow, req

    async def _serve(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        arrival = time.monotonic()
        if self.draining:
            self.metrics.ended("rejected")
            return error_response(503, "the router is shutting down; retry on another replica",
                                  type_="server_error", headers={"Retry-After": "1"})
        if self.in_flight >= self.config.max_in_flight:
            return self._reject(429, f"the router is serving {self.in_flight} requests, its limit",
                                type_="rate_limit_error", retry_after="1")
        try:
            flow, req = self._flow(kind, await read_body(request, self._body_limits))
        except BadRequest as e:
            self.metrics.ended("invalid")
            return e.response
        if not self.pool.ready_to_serve:
            # Refuse before any work: a prefill whose decode side is down would answer 200 and then fail.
            return self._reject(503, self.pool.not_ready_reason(), type_="server_error", retry_after="1")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        events = flow.events()
        outcome: Outcome | None = "error"  # None once `finished` recorded the request
        try:
            try:
                first = await events.__anext__()
            except NoCapacity as e:
                outcome = "rejected"
                return error_response(429, str(e), type_="rate_limit_error",
                                      headers={"Retry-After": str(e.retry_after)})
            except NoWorkers as e:
                return error_response(503, str(e), type_="server_error", headers={"Retry-After": "1"})
            except UpstreamError as e:
                outcome = _outcome(e.status)
                headers = {"Retry-After": e.retry_after or "1"} if e.status in (429, 503) else None
                return error_response(e.status, str(e), type_=e.type, headers=headers)
            ttft = time.monotonic() - arrival
            writer = ResponseWriter(kind, flow.request_id, self.model_name, token_ids=req.return_token_ids)
            if req.stream:
                response, count, ok = await self._stream(request, writer, flow, first, events, req.include_usage)
            else:
                response, count, ok = await self._collect(writer, flow, first, events)
            if ok:
                self.metrics.finished(prompt_tokens=flow.prompt_tokens, output_tokens=count, ttft=ttft,
                                      e2e=time.monotonic() - arrival)
                outcome = None
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            outcome = "aborted"  # the client went away; closing `events` aborts the request downstream
            raise
        finally:
            await events.aclose()
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if self.draining and self.in_flight == 0:
                self.drained.set()
            if outcome is not None:
                self.metrics.ended(outcome)

    async def _stream(self, request, writer: ResponseWriter, flow: RequestFlow, first: Chunk, chunks,
                      include_usage: bool):
        """One SSE event per token while the client keeps up; what piled up as one event once it falls behind."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": flow.request_id})
        await response.prepare(request)
        count, chunk, ok = len(first.token_ids), first, False
        await response.write(writer.events(first.token_ids, first.texts, first.finish_reason))
        try:
            async for chunk in chunks:
                count += len(chunk.token_ids)
                await response.write(writer.events(chunk.token_ids, chunk.texts, chunk.finish_reason))
            ok = chunk.finished
        except UpstreamError as e:
            await response.write(sse(error_body(str(e), type_=e.type, code=e.status)))
        if ok and include_usage:
            await response.write(sse(writer.usage_chunk(flow.prompt_tokens, count)))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response, count, ok

    async def _collect(self, writer: ResponseWriter, flow: RequestFlow, first: Chunk, chunks):
        pieces, ids, chunk = [first.text], list(first.token_ids), first
        try:
            async for chunk in chunks:
                pieces.append(chunk.text)
                ids += chunk.token_ids
        except UpstreamError as e:
            return error_response(e.status, str(e), type_=e.type), len(ids), False
        body = writer.full("".join(pieces), chunk.finish_reason, flow.prompt_tokens, ids)
        return web.json_response(body, headers={"X-Request-Id": flow.request_id}), len(ids), True
