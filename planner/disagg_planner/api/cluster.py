"""Cluster hardware: nodes, GPUs and the links between them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ModelWrapValidatorHandler, PrivateAttr, model_validator

from .base import ApiModel
from .units import Bandwidth, format_bandwidth


class GPUSpec(ApiModel):
    """One accelerator type, with the two ceilings that bound prefill (FLOP/s) and decode (bytes/s)."""

    name: str = Field(min_length=1, max_length=63, description="Name, also used as the node-selector value.")
    memory_gib: float = Field(gt=0, le=4096)
    peak_tflops: float = Field(gt=0, le=100000, description="Dense bf16/fp16 TFLOP/s.")
    hbm_gbps: float = Field(gt=0, le=100000, description="Memory bandwidth, GB/s.")


GPU_PRESETS: dict[str, GPUSpec] = {
    "A100-80GB": GPUSpec(name="A100-80GB", memory_gib=80, peak_tflops=312, hbm_gbps=2039),
    "H100-80GB": GPUSpec(name="H100-80GB", memory_gib=80, peak_tflops=989, hbm_gbps=3350),
    "H200-141GB": GPUSpec(name="H200-141GB", memory_gib=141, peak_tflops=989, hbm_gbps=4800),
    "CPU": GPUSpec(name="CPU", memory_gib=16, peak_tflops=0.5, hbm_gbps=20),
}


# Fields before unit-bearing bandwidths: GB/s (10^9 bytes/s) in a name that reads as gigabits.
_DEPRECATED_BANDWIDTH = {"intraNodeGbps": "intraNodeBandwidth", "interNodeGbps": "interNodeBandwidth"}


def _no_schema_default(schema: dict[str, Any]) -> None:
    # The API server would write the default beside a deprecated field and make the manifest give both
    # forms of one link; the default is applied here instead (it is in the description).
    schema.pop("default", None)


class ClusterSpec(ApiModel):
    """Homogeneous nodes of `gpus_per_node` GPUs, and the bandwidth of the links between them, per direction.

    `intraNodeGbps`/`interNodeGbps` (GB/s as plain numbers) are still read, converted to the bandwidth
    fields, and reported by `deprecations()`; giving both forms of one link is an error.
    """

    nodes: int = Field(ge=1, le=4096)
    gpus_per_node: int = Field(ge=1, le=64)
    gpu_type: Literal["A100-80GB", "H100-80GB", "H200-141GB", "CPU"] | None = Field(
        default="A100-80GB", description="A known GPU; ignored when `gpu` is given."
    )
    gpu: GPUSpec | None = Field(default=None, description="A GPU not among the presets.")
    intra_node_bandwidth: Bandwidth = Field(
        default="300GB", validate_default=True, json_schema_extra=_no_schema_default,
        description="Between GPUs of one node (NVLink), per direction, e.g. 300GB or 900GB; default 300GB.")
    inter_node_bandwidth: Bandwidth = Field(
        default="25GB", validate_default=True, json_schema_extra=_no_schema_default,
        description="Between nodes (the network), per direction, e.g. 200Gbit or 25GB; default 25GB.")
    intra_node_gbps: float | None = Field(default=None, gt=0, le=100000, description="Deprecated: use "
                                          "intraNodeBandwidth. GB/s (gigabytes, not gigabits).")
    inter_node_gbps: float | None = Field(default=None, gt=0, le=100000, description="Deprecated: use "
                                          "interNodeBandwidth. GB/s (gigabytes, not gigabits).")
    _deprecations: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _convert_deprecated_bandwidth(cls, data: Any, handler: ModelWrapValidatorHandler[ClusterSpec]) -> ClusterSpec:
        notes: list[str] = []
        if isinstance(data, dict):
            data = dict(data)
            for old, new in _DEPRECATED_BANDWIDTH.items():
                snake_old, snake_new = _snake(old), _snake(new)
                old_key = old if old in data else snake_old if snake_old in data else None
                if old_key is None or data[old_key] is None:
                    continue
                if data.get(new) is not None or data.get(snake_new) is not None:
                    raise ValueError(f"cluster gives both {old} (deprecated) and {new}; keep only {new}")
                value = data.pop(old_key)
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100000:
                    raise ValueError(f"cluster.{old} must be a number of GB/s in (0, 100000], got {value!r}")
                data[new] = format_bandwidth(float(value) * 1e9)
                notes.append(f"cluster.{old} is deprecated: it was read as {value:g} GB/s (gigabytes); write "
                             f"{new}: {data[new]} (or in bits, e.g. {value * 8:g}Gbit)")
        spec = handler(data)
        if notes:
            spec._deprecations = notes
        return spec

    def deprecations(self) -> list[str]:
        """One note per deprecated field this spec was written with (they were converted)."""
        return list(self._deprecations)

    @property
    def intra_node_gb_per_s(self) -> float:
        """The planner's unit for links: GB/s (10^9 bytes per second)."""
        return self.intra_node_bandwidth / 1e9

    @property
    def inter_node_gb_per_s(self) -> float:
        """The planner's unit for links: GB/s (10^9 bytes per second)."""
        return self.inter_node_bandwidth / 1e9

    @property
    def gpu_spec(self) -> GPUSpec:
        if self.gpu is not None:
            return self.gpu
        if self.gpu_type is None:
            raise ValueError("cluster needs gpuType or gpu")
        return GPU_PRESETS[self.gpu_type]

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
