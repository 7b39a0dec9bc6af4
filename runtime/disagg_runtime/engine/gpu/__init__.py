"""The engine's GPU path: fused Llama forwards with CUDA-graph decode, and a GPU attention backend."""

from .backend import GpuAttentionBackend
from .fused_llama import FusedLlama
from .runner import CAPTURE_SIZES, GpuStepRunner

__all__ = ["CAPTURE_SIZES", "FusedLlama", "GpuAttentionBackend", "GpuStepRunner"]
