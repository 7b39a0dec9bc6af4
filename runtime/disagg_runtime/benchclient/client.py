"""Send a trace of requests at their arrival times and time every streamed token."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np
from disagg_planner.workloads import SimRequest

from .prompts import PromptMode, make_prompt


@dataclass
class RequestRecord:
    """What one request saw, in seconds from the start of the run."""

    index: int
    input_len: int
    output_len: int
    scheduled: float
    sent: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0  # streamed chunks that carried a choice
    reported_tokens: int | None = None  # the server's usage.completion_tokens, when it sends usage
    status: int = 0
    error: str | None = None
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.first_token is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean gap between output tokens after the first (0 for one-token outputs)."""
        if self.first_token is None or self.last_token is None:
            return None
        # A server may pack several tokens into one chunk; its usage count is then the true denominator.
        n = self.reported_tokens or self.tokens
        return (self.last_token - self.first_token) / (n - 1) if n > 1 else 0.0

    @property
    def e2e(self) -> float | None:
        return None if self.last_token is None else self.last_token - self.sent

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("token_times")
        return {**d, "ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}


async def server_max_context(session: aiohttp.ClientSession, url: str) -> tuple[str | None, int | None]:
    """(model id, context length) from /v1/models when the server says (ours and vLLM do)."""
    try:
        async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            data = (await resp.json())["data"][0]
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError):
        return None, None
    return data.get("id"), data.get("max_model_len")


class ServerUnreachable(Exception):
    """The server refused or never took connections: the run stops instead of playing out its schedule."""


# Connection failures in a row (no request answered in between) after which the server counts as unreachable.
UNREACHABLE_AFTER = 3


@dataclass
class _Reachability:
    failures: int = 0
    answered: int = 0
    last_error: str = ""

    @property
    def gone(self) -> bool:
        return self.failures >= UNREACHABLE_AFTER


async def check_reachable(session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> None:
    """ServerUnreachable unless `url` answers HTTP at all (any status: it may not serve /v1/models)."""
    try:
        async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError, ValueError) as e:
        detail = str(e) or type(e).__name__
        raise ServerUnreachable(f"cannot reach {url}: {detail}") from None


async def _one(session: aiohttp.ClientSession, url: str, body: dict, rec: RequestRecord, t0: float,
               timeout: float, reach: _Reachability | None = None) -> None:
    rec.sent = time.perf_counter() - t0
    reach = reach if reach is not None else _Reachability()
    try:
        async with session.post(f"{url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = (await resp.text())[:300]
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    rec.error = str(msg["error"].get("message", msg["error"]))[:300]
                    return
                if msg.get("usage"):
                    rec.reported_tokens = msg["usage"].get("completion_tokens")
                if not msg.get("choices"):
                    continue
                now = time.perf_counter() - t0
                rec.tokens += 1
                rec.token_times.append(now)
                if rec.first_token is None:
                    rec.first_token = now
                rec.last_token = now
    except aiohttp.ClientConnectorError as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        reach.failures += 1
        reach.last_error = str(e)
        return
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
    reach.answered += 1
    reach.failures = 0


async def run_trace(url: str, trace: list[SimRequest], *, model: str | None, prompt_mode: PromptMode = "ids",
                    seed: int = 0, timeout: float = 600.0) -> list[RequestRecord]:
    """Replay `trace` (arrival times in seconds) against `url`; one record per request, in trace order."""
    url = url.rstrip("/")
    rng = np.random.default_rng(seed)
    prompts = [make_prompt(r.input_len, prompt_mode, rng) for r in trace]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        records = [RequestRecord(i, r.input_len, r.output_len, r.arrival) for i, r in enumerate(trace)]
        t0 = time.perf_counter()
        tasks = []
        reach = _Reachability()
        try:
            for rec, prompt in zip(records, prompts, strict=True):
                delay = rec.scheduled - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                if reach.gone:
                    break
                body = {"prompt": prompt, "max_tokens": rec.output_len, "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True}
                if model:
                    body["model"] = model
                tasks.append(asyncio.create_task(_one(session, url, body, rec, t0, timeout, reach)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        if reach.gone:
            raise ServerUnreachable(f"{url} refused {reach.failures} connections in a row ({reach.last_error}); "
                                    f"stopped the run after {reach.answered} answered requests")
    return records
