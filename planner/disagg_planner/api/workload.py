"""Workload: arrival rate and prompt/output length distributions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import ApiModel

DatasetName = Literal["chatbot", "code", "summarization"]


class LengthHistogram(ApiModel):
    """Token-length histogram: `counts[i]` requests with lengths in [edges[i], edges[i+1])."""

    edges: list[int] = Field(min_length=2, max_length=1024)
    counts: list[float] = Field(min_length=1, max_length=1023)

    @model_validator(mode="after")
    def _consistent(self) -> LengthHistogram:
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(f"counts has {len(self.counts)} bins but edges define {len(self.edges) - 1}")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")
        if self.edges[0] < 1:
            raise ValueError("lengths start at 1 token")
        if any(c < 0 for c in self.counts) or sum(self.counts) <= 0:
            raise ValueError("counts must be non-negative with a positive total")
        return self

    @property
    def mean(self) -> float:
        total = sum(self.counts)
        return sum(c * (a + b - 1) / 2 for c, a, b in zip(self.counts, self.edges, self.edges[1:], strict=False)) / total

    @property
    def max(self) -> int:
        return self.edges[-1] - 1


class WorkloadSpec(ApiModel):
    """Poisson arrivals at `rate` req/s; lengths from a named dataset shape or explicit histograms."""

    rate: float = Field(gt=0, le=1e6, description="Target arrival rate, requests/s.")
    dataset: DatasetName | None = Field(default="chatbot", description="Named length shape.")
    input_lengths: LengthHistogram | None = None
    output_lengths: LengthHistogram | None = None
    max_tokens_lengths: LengthHistogram | None = Field(
        default=None,
        description="Optional: the max_tokens clients send (a request's limit is the larger of a draw and its "
        "output). The engine refuses prompt + max_tokens beyond the context or the KV cache; its KV grows with "
        "the actual output.",
    )

    @model_validator(mode="after")
    def _has_lengths(self) -> WorkloadSpec:
        explicit = (self.input_lengths is None, self.output_lengths is None)
        if explicit[0] != explicit[1]:
            raise ValueError("give both input_lengths and output_lengths, or neither")
        if self.dataset is None and explicit[0]:
            raise ValueError("set dataset or give input_lengths and output_lengths")
        return self
