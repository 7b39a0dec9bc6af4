"""GPU kernels for the engine (Triton), each with a torch reference that is also the CPU path."""

from .ops import (
                  paged_decode_attention,
                  rms_norm,
                  rope_and_store_kv,
                  silu_and_mul,
                  triton_available,
                  varlen_causal_attention,
)
from .reference import rope_tables

__all__ = [
    "paged_decode_attention",
    "rms_norm",
    "rope_and_store_kv",
    "rope_tables",
    "silu_and_mul",
    "triton_available",
    "varlen_causal_attention",
]
