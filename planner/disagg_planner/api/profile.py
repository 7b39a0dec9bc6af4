"""Latency profile: measured step times written by the runtime profiler and fitted by the planner.

One JSON file per (model, GPU type). Each entry holds the samples of one instance shape (tp, pp);
samples carry the sufficient statistics of the latency model's regressors, so a profile stays small
however many configurations were timed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydantic import Field

from .base import ApiModel
from .model import ModelSpec

PROFILE_VERSION = 1


class PrefillSample(ApiModel):
    """One timed prefill step over a batch of prompts."""

    batch_size: int = Field(ge=1)
    sum_tokens: int = Field(ge=1, description="Σ prompt lengths.")
    sum_sq_tokens: int = Field(ge=1, description="Σ prompt length², the attention term.")
    seconds: float = Field(gt=0)


class DecodeSample(ApiModel):
    """One timed decode step: one new token for each of `batch_size` sequences."""

    batch_size: int = Field(ge=1)
    sum_context: int = Field(ge=0, description="Σ tokens already in each sequence's KV cache.")
    seconds: float = Field(gt=0)


class MixedSample(ApiModel):
    """One timed mixed step (chunked prefill): one token for each of `decode_batch` running sequences plus
    `chunks` prompt chunks of `chunk_tokens` tokens in all.

    `chunk_attention` is Σ((offset + c)² - offset²) over the chunks (c tokens starting at `offset`): the
    causal-attention work of the chunk against the prompt's earlier chunks, in the units of a prefill's
    Σlen² (the chunks of one prompt add up to its length²).
    """

    decode_batch: int = Field(ge=0)
    decode_context: int = Field(ge=0, description="Σ tokens already in each decoding sequence's KV cache.")
    chunks: int = Field(ge=0)
    chunk_tokens: int = Field(ge=0)
    chunk_attention: int = Field(ge=0)
    seconds: float = Field(gt=0)


class ShapeProfile(ApiModel):
    """Samples for one instance shape.

    `seconds` is the wall time of one step through the whole instance: all `pp` stages, with their
    activation sends, and the tensor-parallel collectives of all `tp` ranks.
    """

    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    prefill: list[PrefillSample] = Field(default_factory=list)
    decode: list[DecodeSample] = Field(default_factory=list)
    mixed: list[MixedSample] = Field(
        default_factory=list, description="Chunked-prefill steps; without them the planner derives mixed steps "
        "from the prefill and decode fits.")


class LatencyProfile(ApiModel):
    """A runtime's measured step times for one model on one GPU type."""

    version: int = PROFILE_VERSION
    model: ModelSpec
    gpu: str = Field(description="GPU type name (matches ClusterSpec.gpu_type / GPUSpec.name).")
    device: str = Field(default="", description="What the profiler ran on, as the driver reports it.")
    created: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    runtime: str = Field(default="disagg", description="Engine name and version.")
    shapes: list[ShapeProfile] = Field(min_length=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(by_alias=True, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        return cls.model_validate_json(Path(path).read_text())
