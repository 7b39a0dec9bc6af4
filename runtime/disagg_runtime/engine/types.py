"""Requests, sampling parameters, step outputs and the engine's errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; `seed` makes sampling reproducible per request."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidRequest for values no engine can honour."""
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")


@dataclass
class GenerationRequest:
    """A tokenized prompt and how to continue it."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class StepOutput:
    """One new token of one request; `text` is the newly printable text (may be empty)."""

    request_id: str
    token_id: int
    text: str
    finished: bool
    finish_reason: FinishReason | None = None


class EngineError(RuntimeError):
    """Base of the engine's own errors."""


class KVCacheFull(EngineError):
    """No room in the KV cache right now; retry after running requests finish."""


class RequestTooLarge(ValueError):
    """The request can never fit: prompt + max_tokens exceeds the model context or the whole KV cache."""


class InvalidRequest(ValueError):
    """The request is malformed (empty prompt, token id out of range, bad sampling values)."""


class DuplicateRequest(ValueError):
    """A request with this id is already in the engine."""


class UnknownRequest(KeyError):
    """No request with this id is in the engine."""
