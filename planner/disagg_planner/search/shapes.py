"""The search space: instance shapes (tp, pp) per phase, and the low node-affinity stage segments."""

from __future__ import annotations

from dataclasses import dataclass

from ..api.slo import SearchBounds
from ..latency import LatencyModel
from ..latency.shape import tensor_parallel_degrees


@dataclass(frozen=True, order=True)
class Shape:
    """One instance's parallelism: `pp` pipeline stages of `tp` tensor-parallel GPUs."""

    tp: int
    pp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}·pp{self.pp}"


@dataclass(frozen=True, order=True)
class Segments:
    """A low node-affinity unit: per pipeline stage, a prefill segment and a decode segment on one node."""

    prefill_tp: int
    decode_tp: int
    pp: int

    @property
    def gpus(self) -> int:
        return (self.prefill_tp + self.decode_tp) * self.pp

    @property
    def prefill(self) -> Shape:
        return Shape(self.prefill_tp, self.pp)

    @property
    def decode(self) -> Shape:
        return Shape(self.decode_tp, self.pp)


def instance_shapes(
    latency: LatencyModel, bounds: SearchBounds, gpus_per_node: int, max_gpus: int, num_layers: int
) -> list[Shape]:
    """Every (tp, pp) that fits the model's weights in memory and `max_gpus`, smallest first.

    tp is any degree the model splits over (heads, KV heads, MLP) within a node (tensor-parallel all-reduces
    need NVLink); pp is any stage count up to the layer count.
    """
    shapes = [
        Shape(tp, pp)
        for tp in tensor_parallel_degrees(latency.model, min(bounds.max_tp, gpus_per_node))
        for pp in range(1, min(bounds.max_pp, num_layers) + 1)
        if tp * pp <= max_gpus and latency.fits(tp, pp)
    ]
    return sorted(shapes, key=lambda s: (s.gpus, s.pp, s.tp))


def segment_units(
    latency: LatencyModel, bounds: SearchBounds, gpus_per_node: int, max_gpus: int, num_layers: int
) -> list[Segments]:
    """Every low-affinity unit: prefill_tp + decode_tp <= GPUs per node, both segments' instances fit memory."""
    tps = tensor_parallel_degrees(latency.model, min(bounds.max_tp, gpus_per_node))
    units = [
        Segments(tp_p, tp_d, pp)
        for pp in range(1, min(bounds.max_pp, num_layers) + 1)
        for tp_p in tps
        for tp_d in tps
        if tp_p + tp_d <= gpus_per_node
        and (tp_p + tp_d) * pp <= max_gpus
        and latency.fits(tp_p, pp)
        and latency.fits(tp_d, pp)
    ]
    return sorted(units, key=lambda u: (u.gpus, u.pp, u.prefill_tp, u.decode_tp))
