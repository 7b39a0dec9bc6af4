"""Latency profile: measured step times written by the runtime profiler and fitted by the planner.

One JSON file per (model, GPU type). Each entry holds the samples of one instance shape (tp, pp);
samples carry the sufficient statistics of the latency model's regressors, so a profile stays small
however many configurations were timed.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from .base import ApiModel
from .model import ModelSpec

# 2: the optional `served` section; 3: its optional decodeByBatch table; 4: decodeStepBatches (older files
# load unchanged)
PROFILE_VERSION = 4

ServedMode = Literal["colocated", "disaggregated"]


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
    overlapped_decode: bool = Field(
        default=False, description="The engine launches each decode step before the host has read the one "
        "before (overlapped scheduling). What runs after a decode step is then chosen when that step starts, "
        "so a prompt arriving during a decode step waits one more step before its prefill.")
    decode_step_batches: list[int] = Field(
        default_factory=list, description="The batch sizes the engine runs a decode step at (its CUDA-graph "
        "sizes): a step of B sequences runs at the smallest one >= B, its padding rows streaming the weights "
        "with the rest but attending to nothing. Past the largest, and when empty, a step runs at its own size.")

    @field_validator("decode_step_batches")
    @classmethod
    def _increasing(cls, sizes: list[int]) -> list[int]:
        if any(b < 1 for b in sizes) or any(b >= c for b, c in itertools.pairwise(sizes)):
            raise ValueError(f"decodeStepBatches must be positive and strictly increasing, got {sizes}")
        return sizes


class ServedProbe(ApiModel):
    """One group of probe requests the served-path profiler sent, and what the engine alone takes for it.

    `prefill`: TTFT of single requests sent back to back against one engine prefill of `tokens`;
    `decode`: the inter-token gap while `batch_size` requests decode together against one engine decode
    step of that batch; `kv_handoff`: the gap from the first to the second token of a disaggregated single,
    less the served decode step (the pull, its handshakes and the router's hop to the decode worker).
    Under a Poisson load of the colocated worker (its step trace; disagg_runtime.served_load):
    `decode_loaded`: decode steps of up to `batch_size` sequences (down to the next probed batch) against
    the engine's step at their batch and context; `prefill_behind_decode`: what prefills launched while
    decodes ran held the decoders for beyond the decode step in flight, against the engine prefill of the
    same prompts (`batch_size`, `tokens`: the median prefill's prompts and their length).
    Values are medians over `samples` measurements (of the differences, for the loaded kinds).
    """

    kind: Literal["prefill", "decode", "kv_handoff", "decode_loaded", "prefill_behind_decode"]
    batch_size: int = Field(ge=1)
    tokens: int = Field(ge=1, description="Prompt tokens of each request.")
    samples: int = Field(ge=1)
    measured_seconds: float = Field(ge=0)
    engine_seconds: float = Field(ge=0, description="The profile's engine fit at the same step.")


class DecodeOverheadPoint(ApiModel):
    """What the served path adds to one decode step of `batch_size` sequences (seconds)."""

    batch_size: int = Field(ge=1)
    seconds: float = Field(ge=0)


class ServedOverhead(ApiModel):
    """What the served path adds to the engine's steps, measured through the real router and workers.

    The latency model adds each part where it is paid: a decode step of B sequences takes
    `decode_overhead_s(B)` longer (as DistServe's simulator adds its fixed per-step Ray overhead): the
    decodeByBatch table where there is one, else decodeStepS + B·decodePerSeqS; each request's tokens reach
    its client prefillS later (TTFT and end-to-end time, not the engine's steps); a colocated prefill
    launched while decodes run takes prefillBehindDecodeS longer (or shorter); a disaggregated request
    starts decoding kvHandoffS later than its KV transfer alone would allow.
    """

    prefill_s: float = Field(default=0.0, ge=0, description="Added to each request's TTFT (and end-to-end "
                             "time): the router and worker hops, the relay of the first token and the hand-offs "
                             "between them. Latency only: the engine runs other steps meanwhile.")
    decode_step_s: float = Field(default=0.0, ge=0, description="Added to each decode step (TPOT), whatever its "
                                 "batch, where decodeByBatch is empty.")
    decode_per_seq_s: float = Field(default=0.0, ge=0, description="Added to each decode step per sequence in it "
                                    "(the relay's per-token work) where decodeByBatch is empty; with a one-point "
                                    "table, the growth past that point.")
    decode_by_batch: list[DecodeOverheadPoint] = Field(
        default_factory=list, description="The decode-step overhead at each probed batch, batch strictly "
        "increasing and seconds non-decreasing; interpolated between points, the first point's value below "
        "the first batch, the last segment's slope continued past the last. It grows faster than a line at "
        "large batch (on an H200: ~0 up to 32 sequences, then 0.13/0.25/0.86 ms at 64/128/256), which a "
        "line fitted through mostly small batches under-charges by 3-5x there. Empty (older profiles): "
        "decodeStepS + B·decodePerSeqS, which stays written as a summary either way.")
    prefill_behind_decode_s: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="Colocated: what a prefill launched while decodes run adds to "
        "the step time the engine profile gives it, measured under load (decode_loaded and "
        "prefill_behind_decode probes). Negative where part of the profiled time, the host work timed from "
        "idle, hides behind the decode step in flight (an overlapped engine). None: not measured.")
    kv_handoff_s: float | None = Field(default=None, ge=0, description="Disaggregated: fixed cost of each "
                                       "request's KV hand-off (hop to the decode worker, pull handshakes, import), "
                                       "beyond the bytes over the link.")
    kv_link_gbps: float | None = Field(default=None, gt=0, description="Disaggregated: the pulls' bandwidth "
                                       "seen by the probes (GB/s), where prompts of two lengths were sent.")
    probes: list[ServedProbe] = Field(default_factory=list, description="The measurements the values come from.")

    @field_validator("decode_by_batch")
    @classmethod
    def _table_rises_with_batch(cls, table: list[DecodeOverheadPoint]) -> list[DecodeOverheadPoint]:
        # Interpolation needs sorted, distinct batches. An overhead that falls as the batch grows is probe
        # noise (the profiler's isotonic fit pools it away); kept, it would make a larger batch cheaper.
        for before, after in itertools.pairwise(table):
            if after.batch_size <= before.batch_size:
                raise ValueError(f"decodeByBatch must list strictly increasing batchSize, got {after.batch_size} "
                                 f"after {before.batch_size}; sort the points and merge duplicates")
            if after.seconds < before.seconds:
                raise ValueError(f"decodeByBatch seconds must not fall as the batch grows, got {after.seconds:.3g} s "
                                 f"at batch {after.batch_size} after {before.seconds:.3g} s at batch "
                                 f"{before.batch_size}; refit the probes (served_profiler.overhead_from_probes "
                                 "pools such dips)")
        return table

    @property
    def decode_tail_per_seq_s(self) -> float:
        """Seconds each sequence past the table's last batch adds to a decode step: the last segment's slope;
        with one point or none, `decode_per_seq_s`."""
        table = self.decode_by_batch
        if len(table) < 2:
            return self.decode_per_seq_s
        lo, hi = table[-2], table[-1]
        return (hi.seconds - lo.seconds) / (hi.batch_size - lo.batch_size)

    def decode_overhead_s(self, batch: int) -> float:
        """Seconds the served path adds to one decode step of `batch` sequences (see `decode_by_batch`)."""
        table = self.decode_by_batch
        if not table:
            return self.decode_step_s + self.decode_per_seq_s * batch
        first, last = table[0], table[-1]
        if batch <= first.batch_size:
            return first.seconds
        if batch >= last.batch_size:
            return last.seconds + self.decode_tail_per_seq_s * (batch - last.batch_size)
        at = bisect.bisect_right(table, batch, key=lambda p: p.batch_size)
        lo, hi = table[at - 1], table[at]
        return lo.seconds + (hi.seconds - lo.seconds) * (batch - lo.batch_size) / (hi.batch_size - lo.batch_size)


class LatencyProfile(ApiModel):
    """A runtime's measured step times for one model on one GPU type."""

    version: int = PROFILE_VERSION
    model: ModelSpec
    gpu: str = Field(description="GPU type name (matches ClusterSpec.gpu_type / GPUSpec.name).")
    device: str = Field(default="", description="What the profiler ran on, as the driver reports it.")
    created: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    runtime: str = Field(default="disagg", description="Engine name and version.")
    shapes: list[ShapeProfile] = Field(min_length=1)
    served: dict[ServedMode, ServedOverhead] = Field(
        default_factory=dict, description="Served-path overheads by serving mode (`disagg profile --served`); "
        "empty: the engine's step times alone.")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(by_alias=True, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        return cls.model_validate_json(Path(path).read_text())
