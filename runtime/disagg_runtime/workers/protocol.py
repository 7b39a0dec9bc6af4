"""Messages between the router and the workers (JSON over HTTP; streamed replies are NDJSON lines).

The prefill worker answers each request with an NDJSON stream (heartbeats, then one `prefilled` line).
Decode and colocated workers take a request by POST, answer `Accepted` (or refuse) at once, and send its
tokens on the router's relay connection (workers/relay.py). Streams carry heartbeat lines while the
worker has nothing else to say, so the router can tell a slow request (heartbeats keep coming) from a
dead worker (silence, or a broken connection).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_REQUEST_ID = 256


class WireModel(BaseModel):
    """Internal messages: strict (a typo in a field name is a bug, not something to ignore)."""

    model_config = ConfigDict(extra="forbid")


class SamplingSpec(WireModel):
    """Sampling parameters as the engine takes them (engine.SamplingParams)."""

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False


class KVRankRef(WireModel):
    """The KV server of one rank of a multi-rank prefill instance; host "" is the instance's own host."""

    host: str = ""
    port: int = Field(ge=1, le=65535)


class StagedKVRef(WireModel):
    """Where a single-rank prefill engine keeps a request's staged KV (kv/arena.py), and its shape: a decode
    worker on the same node with an ipc link reads it directly instead of pulling."""

    arena: str = Field(min_length=1, max_length=64, pattern="^[0-9a-f]+$")
    offset: int = Field(ge=0)
    model_id: str = Field(min_length=1, max_length=1024)
    dtype: Literal["bfloat16", "float16", "float32"]
    num_layers: int = Field(ge=1, le=4096)
    num_kv_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=1, le=4096)
    num_tokens: int = Field(ge=1)


class KVSourceRef(WireModel):
    """Where the decode worker pulls a request's KV from (rank 0's KV server; `ranks` when tp x pp > 1)."""

    host: str
    port: int = Field(ge=1, le=65535)
    ticket: str | None = Field(default=None, max_length=128,
                               description="Issued by the prefill worker with this request's KV; a pull must present it.")
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    ranks: list[KVRankRef] = Field(default_factory=list, description="every rank's KV server, rank order")
    staged: StagedKVRef | None = Field(default=None, description="set when a direct read is possible")

    @model_validator(mode="after")
    def _ranks_match(self) -> KVSourceRef:
        if self.tp * self.pp > 1 and len(self.ranks) != self.tp * self.pp:
            raise ValueError(f"a tp={self.tp} x pp={self.pp} KV source lists {len(self.ranks)} ranks")
        return self

    def sources(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every rank's KV server, rank order."""
        if not self.ranks:
            return ((self.host, self.port),)
        return tuple((r.host or self.host, r.port) for r in self.ranks)


class PrefillRequest(WireModel):
    """Router -> prefill worker: run the prompt, return the first token, park the KV for a pull."""

    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID)
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)

    @model_validator(mode="after")
    def _one_prompt(self) -> PrefillRequest:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt or prompt_ids")
        return self


class GenerateRequest(PrefillRequest):
    """Router -> colocated worker: run the whole request; its tokens go out on relay connection `relay`."""

    relay: str = Field(min_length=1, max_length=128)


class Accepted(WireModel):
    """Decode or colocated worker -> router: the request is taken; its tokens follow on the relay."""

    request_id: str
    prompt_tokens: int


class TokenEvent(WireModel):
    """One generated token."""

    type: Literal["token"] = "token"
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None = None


class PrefillResult(WireModel):
    """Prefill worker -> router: the first token, and where the KV waits (None if already finished)."""

    type: Literal["prefilled"] = "prefilled"
    request_id: str
    prompt_ids: list[int]
    first: TokenEvent
    kv: KVSourceRef | None


class DecodeRequest(WireModel):
    """Router -> decode worker: continue a prefilled request; the worker pulls its KV when it has room."""

    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID)
    prompt_ids: list[int] = Field(min_length=1)
    sampling: SamplingSpec
    first_token_id: int
    kv: KVSourceRef
    relay: str = Field(min_length=1, max_length=128, description="the relay connection its tokens go out on")


class Heartbeat(WireModel):
    """Nothing new yet; the worker is alive."""

    type: Literal["heartbeat"] = "heartbeat"


class ErrorEvent(WireModel):
    """The request failed inside the worker; the stream ends after this."""

    type: Literal["error"] = "error"
    message: str
    code: int = 500


class WorkerStats(WireModel):
    """A worker's load, polled by the router to pick instances and to apply admission control."""

    role: Literal["prefill", "decode", "colocated"]
    model_id: str
    ready: bool
    draining: bool
    queue_depth: int = Field(description="prefill: requests waiting; decode: requests waiting for their KV")
    queued_tokens: int = 0
    max_queue: int
    running: int
    free_blocks: int
    total_blocks: int
    block_size: int
    max_context: int
    kv_port: int | None = None
