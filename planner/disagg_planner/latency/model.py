"""LatencyModel: step times of one model on one GPU type, from a fitted profile or the roofline."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

from ..api.cluster import GPUSpec
from ..api.model import ModelSpec
from ..api.profile import DecodeOverheadPoint, LatencyProfile, ServedMode, ServedOverhead
from . import analytic
from .fit import DecodeFit, LinearFit, ProfileError, fit_decode, fit_prefill
from .memory import kv_capacity_tokens
from .mixed import MixedFit, fit_mixed_shapes, mixed_stage_time
from .shape import StageShape, allreduce_time, stage_shape

Shape = tuple[int, int]


def kv_transfer_time(model: ModelSpec, tokens: int, link_gbps: float) -> float:
    """Seconds to ship `tokens` tokens of KV cache (all layers) over a `link_gbps` GB/s link."""
    if link_gbps <= 0:
        raise ValueError(f"link bandwidth must be positive, got {link_gbps} GB/s")
    return tokens * model.kv_bytes_per_token / (link_gbps * 1e9)


class LatencyModel:
    """Step-time model for one model on one GPU type; seconds.

    Times are for ONE pipeline stage (the slowest, holding ceil(layers / pp) layers) of a (tp, pp)
    instance; `pipeline_latency` turns a stage time into the end-to-end time through all stages.

    With a profile (`from_profile`), each profiled (tp, pp) shape gets its own least-squares fit
    (prefill ~ a + b·Σlen + c·Σlen², decode ~ a + b·batch + c·Σcontext). A shape that was not profiled is
    derived from the nearest profiled one (in log2 tp and pp): that shape's tensor-parallel all-reduce
    time (estimated, see `shape.allreduce_time`) is taken out, the rest is scaled by tp0/tp and to the
    stage's share of layers, and the new shape's all-reduce time is added back. Without a profile
    (`analytic`), the roofline of `analytic.py` is used.

    `served` (the profile's served-path overheads, see `ServedOverhead`) is added where it is paid. Decode
    steps pay `served.decode_overhead_s(batch)` (the engine thread's per-step work and the relay's per-token
    work, as DistServe's simulator adds its fixed per-step overhead to each step): the profile's per-batch
    table, interpolated, where it has one (the overhead grows faster than a line at large batch), else the
    line `decode_step_s + decode_per_seq_s·batch`. A step pays it once, not per pipeline stage, so a
    stage time carries 1/pp of it (a step through pp stages lasts about pp stage-times). The prefill
    overhead `prefill_s` is the hops a request's first token crosses (router, worker HTTP, relay): it
    delays that request (`request_latency_s`, which the simulators add to its TTFT and end-to-end time)
    but not the engine, which runs its next step meanwhile; charging it to the step time would make the
    engine look busier than it is exactly where attainment turns (the knee).
    """

    def __init__(
        self,
        model: ModelSpec,
        gpu: GPUSpec,
        intra_node_gbps: float,
        source: Literal["profile", "analytic"],
        prefill_fits: dict[Shape, LinearFit] | None = None,
        decode_fits: dict[Shape, LinearFit] | None = None,
        served: ServedOverhead | None = None,
    ) -> None:
        if intra_node_gbps <= 0:
            raise ValueError(f"intra_node_gbps must be positive, got {intra_node_gbps}")
        self.model = model
        self.gpu = gpu
        self.intra_node_gbps = intra_node_gbps
        self.source: Literal["profile", "analytic"] = source
        self.prefill_fits: dict[Shape, LinearFit] = dict(prefill_fits or {})
        # A plain line a + b·batch + c·Σcontext is a DecodeFit without per-batch bases.
        self.decode_fits: dict[Shape, DecodeFit] = {
            key: fit if isinstance(fit, DecodeFit) else DecodeFit(fit.a, fit.b, fit.c, fit.rms_relative_error,
                                                                  fit.outliers)
            for key, fit in (decode_fits or {}).items()}
        if source == "profile" and not (self.prefill_fits and self.decode_fits):
            raise ProfileError("a profile-based latency model needs prefill and decode fits")
        self.mixed_fits: dict[Shape, MixedFit] = {}  # measured chunked-prefill steps (latency/mixed.py)
        # Profiled shapes whose engine overlaps decode steps (ShapeProfile.overlapped_decode); a derived or
        # analytic shape is taken to run each step whole.
        self.overlapped_shapes: set[Shape] = set()
        self.served = served
        self._stages: dict[Shape, StageShape] = {}
        self._capacity: dict[tuple[int, int, float], int] = {}

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def analytic(cls, model: ModelSpec, gpu: GPUSpec, intra_node_gbps: float) -> LatencyModel:
        """Roofline model from the model's shape and the GPU's peak FLOP/s and HBM bandwidth."""
        return cls(model, gpu, intra_node_gbps, "analytic")

    @classmethod
    def from_profile(cls, profile: LatencyProfile, gpu: GPUSpec, intra_node_gbps: float,
                     served_mode: ServedMode | None = None) -> LatencyModel:
        """Fit every profiled shape. Samples are whole-instance step times (all stages of that shape).

        The served-path overheads are those measured for `served_mode`; without one, those of the only
        mode profiled, or with both profiled the larger of each (one model then serves both modes' simulators).
        """
        if profile.gpu != gpu.name:
            raise ProfileError(
                f"profile was measured on {profile.gpu!r} but the cluster's GPU is {gpu.name!r}; "
                "profile this GPU type or drop the profile to use the analytic model"
            )
        prefill: dict[Shape, LinearFit] = {}
        decode: dict[Shape, DecodeFit] = {}
        for shape in profile.shapes:
            key = (shape.tp, shape.pp)
            where = f"profile shape tp={shape.tp} pp={shape.pp}"
            if key in prefill or key in decode:
                raise ProfileError(f"{where} appears twice; merge its samples into one entry")
            if shape.prefill:
                prefill[key] = fit_prefill(shape.prefill, f"{where} prefill")
            if shape.decode:
                decode[key] = fit_decode(shape.decode, f"{where} decode", shape.decode_step_batches)
        if not prefill or not decode:
            missing = "prefill" if not prefill else "decode"
            raise ProfileError(f"profile has no {missing} samples in any shape; the planner needs both phases")
        fitted = cls(profile.model, gpu, intra_node_gbps, "profile", prefill, decode,
                     served=served_overhead(profile, served_mode))
        fitted.mixed_fits = fit_mixed_shapes(profile.shapes)
        fitted.overlapped_shapes = {(shape.tp, shape.pp) for shape in profile.shapes if shape.overlapped_decode}
        return fitted

    # -- shapes and memory --------------------------------------------------------------------------
    def stage(self, tp: int, pp: int) -> StageShape:
        key = (tp, pp)
        found = self._stages.get(key)
        if found is None:
            found = self._stages[key] = stage_shape(self.model, tp, pp)
        return found

    def kv_capacity_tokens(self, tp: int, pp: int, mem_util: float = 0.9) -> int:
        """KV tokens an instance holds after weights and activations; 0 if the model does not fit."""
        key = (tp, pp, mem_util)
        found = self._capacity.get(key)
        if found is None:
            found = self._capacity[key] = kv_capacity_tokens(self.model, self.gpu, tp, pp, mem_util)
        return found

    def overlaps_decode(self, tp: int, pp: int) -> bool:
        """Whether the (tp, pp) engine chooses the step after a decode step when that step starts."""
        return (tp, pp) in self.overlapped_shapes

    def fits(self, tp: int, pp: int) -> bool:
        """True when the shape is valid and leaves KV room for at least one full-context sequence."""
        return self.kv_capacity_tokens(tp, pp) >= self.model.max_context

    # -- served-path overheads -----------------------------------------------------------------------
    @property
    def request_latency_s(self) -> float:
        """Seconds the served path adds to each request's first (and so last) token, not to any step."""
        return self.served.prefill_s if self.served is not None else 0.0

    @property
    def prefill_behind_decode_s(self) -> float:
        """Seconds a colocated prefill launched while decodes run takes beyond its profiled time (negative:
        less, its host work hidden behind the decode step in flight); 0 unprofiled."""
        return (self.served.prefill_behind_decode_s or 0.0) if self.served is not None else 0.0

    @property
    def kv_handoff_s(self) -> float:
        """Fixed seconds a disaggregated request's KV hand-off adds before it can decode (0 unprofiled)."""
        return (self.served.kv_handoff_s or 0.0) if self.served is not None else 0.0

    def _engine_only(self) -> LatencyModel:
        """This model without the served-path overheads (shares the fits and caches)."""
        bare = copy.copy(self)
        bare.served = None
        return bare

    # -- step times ---------------------------------------------------------------------------------
    def prefill_time(self, tp: int, pp: int, lengths: Sequence[int]) -> float:
        """ONE pipeline stage's time to prefill this batch of prompts."""
        if not lengths:
            raise ValueError("a prefill batch needs at least one prompt")
        return self.prefill_stage_time(tp, pp, len(lengths), sum(lengths), sum(n * n for n in lengths))

    def prefill_stage_time(self, tp: int, pp: int, batch: int, sum_tokens: int, sum_sq_tokens: int) -> float:
        """`prefill_time` from the batch's sufficient statistics (what the simulator tracks)."""
        stage = self.stage(tp, pp)
        if self.source == "analytic":
            return analytic.prefill_stage_time(stage, self.gpu, self.intra_node_gbps, batch, sum_tokens, sum_sq_tokens)
        key, fit = self._nearest(self.prefill_fits, tp, pp)
        return self._rescale(key, stage, fit(sum_tokens, sum_sq_tokens), sum_tokens)

    def decode_coefficients(self, tp: int, pp: int, batch: int) -> tuple[float, float]:
        """(base, per-context-token) seconds of ONE stage's decode step: time = base + per_ctx·Σcontext."""
        if batch < 1:
            raise ValueError(f"a decode step needs at least one sequence, got batch={batch}")
        stage = self.stage(tp, pp)
        if self.source == "analytic":
            return analytic.decode_stage_coefficients(stage, self.gpu, self.intra_node_gbps, batch)
        key, fit = self._nearest(self.decode_fits, tp, pp)
        base = self._rescale(key, stage, fit.base(batch), batch)
        if self.served is not None:
            base += self.served.decode_overhead_s(batch) / pp
        return base, fit.c * self._compute_scale(key, stage)

    def decode_time(self, tp: int, pp: int, batch: int, sum_context: int) -> float:
        """ONE stage's time for one decode step of `batch` sequences holding `sum_context` tokens."""
        base, per_context = self.decode_coefficients(tp, pp, batch)
        return base + per_context * sum_context

    def mixed_stage_time(self, tp: int, pp: int, decode_batch: int, decode_context: int, chunks: int,
                         chunk_tokens: int, chunk_attention: int) -> float:
        """ONE stage's time for a chunked-prefill step: decode tokens plus prompt chunks (latency/mixed.py).

        The decode tokens pay a decode step's served overhead; a chunk's request pays its hops in its
        latency (`request_latency_s`), not here.
        """
        if self.served is None:
            return mixed_stage_time(self, tp, pp, decode_batch, decode_context, chunks, chunk_tokens, chunk_attention)
        engine = mixed_stage_time(self._engine_only(), tp, pp, decode_batch, decode_context, chunks, chunk_tokens,
                                  chunk_attention)
        decode = self.served.decode_overhead_s(decode_batch) if decode_batch > 0 else 0.0
        return engine + decode / pp

    @staticmethod
    def micro_batches(pp: int, sequences: int) -> int:
        """Micro-batches the runtime cuts a step of `sequences` into (disagg_runtime.parallel.pipeline)."""
        return max(1, min(pp, sequences))

    @staticmethod
    def pipelined_step(micro_stage_time: float, pp: int, micro: int, micro_act_bytes: float,
                       link_gbps: float) -> float:
        """One step cut into `micro` micro-batches through pp stages, as the runtime runs it (GPipe).

        The first micro-batch crosses all pp stages (pp-1 activation sends on the way); each stage starts
        the next micro-batch as soon as it has sent the previous one, so the others follow one stage-time
        apart: (micro + pp - 1) stage-times of one micro-batch plus pp-1 sends.
        """
        if pp == 1:
            return micro * micro_stage_time
        return (micro + pp - 1) * micro_stage_time + (pp - 1) * micro_act_bytes / (link_gbps * 1e9)

    @staticmethod
    def pipeline_latency(stage_time: float, pp: int, act_bytes: int, link_gbps: float) -> float:
        """End-to-end time through pp equal stages, with pp-1 activation sends of `act_bytes` between them."""
        if pp == 1:
            return stage_time
        return pp * stage_time + (pp - 1) * act_bytes / (link_gbps * 1e9)

    # -- profile scaling ----------------------------------------------------------------------------
    def _nearest(self, fits: dict[Shape, LinearFit], tp: int, pp: int) -> tuple[Shape, LinearFit]:
        exact = fits.get((tp, pp))
        if exact is not None:
            return (tp, pp), exact

        def distance(key: Shape) -> tuple[float, bool, int, int]:
            t0, p0 = key
            return abs(math.log2(tp / t0)) + abs(math.log2(pp / p0)), t0 != tp, t0, p0

        key = min(fits, key=distance)
        return key, fits[key]

    def _compute_scale(self, key: Shape, stage: StageShape) -> float:
        """Factor from the profiled shape's whole-instance compute to one stage of the target shape."""
        tp0, _ = key
        return tp0 / stage.tp * stage.layers / self.model.num_layers

    def _rescale(self, key: Shape, stage: StageShape, measured: float, tokens: int) -> float:
        if key == (stage.tp, stage.pp):
            return measured * stage.layers / self.model.num_layers
        profiled = self.stage(*key)
        # The profiled time includes that shape's all-reduces over all its stages; take them out.
        comm0 = allreduce_time(profiled, tokens, self.intra_node_gbps) * key[1]
        compute = max(measured - comm0, 0.0)
        return compute * self._compute_scale(key, stage) + allreduce_time(stage, tokens, self.intra_node_gbps)


def served_overhead(profile: LatencyProfile, mode: ServedMode | None) -> ServedOverhead | None:
    """The profile's served-path overheads for `mode` (see `LatencyModel.from_profile`); None if unprofiled.

    Without a mode and with both profiled, one model serves both modes' simulators, so it charges the
    larger of each value; the decode-step overhead is at least each mode's at every batch (`_merged_decode`).
    """
    if mode is not None:
        found = profile.served.get(mode)
        if found is None and profile.served:
            raise ProfileError(f"the profile's served-path overheads are for {sorted(profile.served)}, not {mode!r}; "
                               f"run `disagg profile --served {mode}` or pick a profiled mode")
        return found
    measured = list(profile.served.values())
    if len(measured) <= 1:
        return measured[0] if measured else None
    handoffs = [o.kv_handoff_s for o in measured if o.kv_handoff_s is not None]
    return ServedOverhead(prefill_s=max(o.prefill_s for o in measured),
                          decode_step_s=max(o.decode_step_s for o in measured),
                          decode_per_seq_s=max(o.decode_per_seq_s for o in measured),
                          decode_by_batch=_merged_decode(measured),
                          kv_handoff_s=max(handoffs) if handoffs else None)


def _merged_decode(modes: Sequence[ServedOverhead]) -> list[DecodeOverheadPoint]:
    """A decode-overhead table that is at least each mode's `decode_overhead_s` at every batch; empty where
    no mode has a table (the max of each line coefficient already bounds every line).

    Its points are the union of the modes' batches, at the largest mode's value: between two of them each
    mode is linear, so the interpolated max is the chord over a convex function, above it, and below the
    first the modes are non-decreasing. Past the last batch every mode continues a line and the table its
    last slope, so two more points follow: where the steepest line has overtaken all the others (rounded
    up to a batch) and one batch later, which makes the table continue that line from there.
    """
    if not any(o.decode_by_batch for o in modes):
        return []
    batches = sorted({p.batch_size for o in modes for p in o.decode_by_batch})
    last = batches[-1]
    tails = [(o.decode_overhead_s(last), o.decode_tail_per_seq_s) for o in modes]
    top_slope = max(slope for _, slope in tails)
    top_value = max(value for value, slope in tails if slope == top_slope)
    overtaken = max((last + (value - top_value) / (top_slope - slope) for value, slope in tails if value > top_value),
                    default=last)
    batches += [b for b in (math.ceil(overtaken), math.ceil(overtaken) + 1) if b > last]
    return [DecodeOverheadPoint(batch_size=b, seconds=max(o.decode_overhead_s(b) for o in modes)) for b in batches]
