"""The OpenAI wire format: request bodies the router accepts and the responses and chunks it sends."""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..workers.protocol import SamplingSpec

MAX_STOP_STRINGS = 16


class _Request(BaseModel):
    # Clients send fields we do not use (user, logit_bias with empty maps, ...); ignore rather than reject.
    # Strict, as the OpenAI API is: "16" is not an integer and "yes" not a boolean (an int is still a float).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, description="One choice per request.")
    ignore_eos: bool = Field(default=False, description="Extension (as in vLLM): generate exactly max_tokens.")
    return_token_ids: bool = Field(default=False, description="Extension (as in vLLM): output token ids too.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, max_tokens: int) -> SamplingSpec:
        return SamplingSpec(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                            stop=self.stop_list, ignore_eos=self.ignore_eos)


class CompletionRequest(_Request):
    """POST /v1/completions. `prompt` is text or token ids; one prompt per request."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request; send a batch as separate requests")
        if isinstance(v, list) and not v or v == "":
            raise ValueError("prompt is empty")
        return v

    def prompt_parts(self) -> tuple[str | None, list[int] | None]:
        """(text, None) or (None, token ids)."""
        if isinstance(self.prompt, str):
            return self.prompt, None
        if isinstance(self.prompt[0], str):
            return str(self.prompt[0]), None
        return None, [int(t) for t in self.prompt]


class ChatMessage(BaseModel):
    """One message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Kind = Literal["completion", "chat"]


class ResponseWriter:
    """Builds the JSON bodies of one request's response, streamed or not, in the OpenAI shapes."""

    def __init__(self, kind: Kind, request_id: str, model: str, *, token_ids: bool = False) -> None:
        self.kind = kind
        self.token_ids = token_ids
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self._role_sent = False
        self._token_event: tuple[str, str, str] | None = None  # a middle token's event, split at text and id

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None, token_ids: list[int]) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        else:
            delta: dict = {"content": text} if text or not finish_reason else {}
            if not self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent = True
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        if self.token_ids:
            choice["token_ids"] = token_ids
        return {**self._base(obj), "choices": [choice]}

    def events(self, token_ids: list[int], texts: list[str], finish_reason: str | None) -> bytes:
        """SSE events for tokens that arrived together: one per token, or one for all when `texts` were joined."""
        if len(texts) != len(token_ids):
            return sse(self.chunk("".join(texts), finish_reason, token_ids))
        out = []
        last = len(token_ids) - 1
        for i, token_id in enumerate(token_ids):
            if i < last or finish_reason is None:
                out.append(self._middle_event(texts[i], token_id))
            else:
                out.append(sse(self.chunk(texts[i], finish_reason, [token_id])))
        return b"".join(out)

    def _middle_event(self, text: str, token_id: int) -> bytes:
        """The event of a token that is neither the stream's first nor its last, from a template: the same
        bytes `sse(chunk(...))` gives, without building and serializing the whole chunk per token."""
        if not self._role_sent:
            return sse(self.chunk(text, None, [token_id]))
        if self._token_event is None:
            text_mark, id_mark = "\u0001", 1234567890123
            whole = sse(self.chunk("\u0001", None, [id_mark])).decode()
            head, rest = whole.rsplit(json.dumps(text_mark), 1)
            middle, tail = rest.rsplit(str(id_mark), 1) if self.token_ids else (rest, "")
            self._token_event = (head, middle, tail)
        head, middle, tail = self._token_event
        if self.token_ids:
            return f"{head}{json.dumps(text)}{middle}{token_id}{tail}".encode()
        return f"{head}{json.dumps(text)}{middle}".encode()

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {**self._base(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def full(self, text: str, finish_reason: str | None, prompt_tokens: int, token_ids: list[int]) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        if self.token_ids:
            choice["token_ids"] = token_ids
        return {**self._base(obj), "choices": [choice], "usage": usage(prompt_tokens, len(token_ids))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def error_body(message: str, *, type_: str, code: int) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
