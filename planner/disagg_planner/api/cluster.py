"""Cluster hardware: nodes, GPUs and the links between them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import ApiModel


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


class ClusterSpec(ApiModel):
    """Homogeneous nodes of `gpus_per_node` GPUs; links given in GB/s per direction."""

    nodes: int = Field(ge=1, le=4096)
    gpus_per_node: int = Field(ge=1, le=64)
    gpu_type: Literal["A100-80GB", "H100-80GB", "H200-141GB", "CPU"] | None = Field(
        default="A100-80GB", description="A known GPU; ignored when `gpu` is given."
    )
    gpu: GPUSpec | None = Field(default=None, description="A GPU not among the presets.")
    intra_node_gbps: float = Field(default=300.0, gt=0, le=100000, description="NVLink, GB/s.")
    inter_node_gbps: float = Field(default=25.0, gt=0, le=100000, description="Network, GB/s.")

    @model_validator(mode="after")
    def _names_a_gpu(self) -> ClusterSpec:
        if self.gpu is None and self.gpu_type is None:
            raise ValueError("cluster.gpuType is null and cluster.gpu is not given: name a GPU type or describe the GPU")
        return self

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
