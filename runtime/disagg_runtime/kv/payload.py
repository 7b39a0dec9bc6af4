"""One request's KV cache as it leaves a prefill engine and enters a decode engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

KVDType = Literal["bfloat16", "float16", "float32"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class KVMismatchError(ValueError):
    """A KV payload does not match what the receiving engine or the header promised."""


class KVHeader(BaseModel):
    """What a receiver needs to check and place a request's KV before reading the tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1, max_length=256)
    model_id: str = Field(min_length=1)
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1, description="KV heads held by this shard (after tensor parallelism).")
    head_dim: int = Field(ge=1)
    dtype: KVDType
    num_tokens: int = Field(ge=1)

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        return (self.num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def layer_nbytes(self) -> int:
        """Bytes of K plus V for one layer, uncompressed."""
        n, h, d = self.layer_shape
        return 2 * n * h * d * TORCH_DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes


@dataclass
class KVPayload:
    """Per-layer K and V, each of shape (num_tokens, num_kv_heads, head_dim), contiguous."""

    header: KVHeader
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def check(self) -> None:
        """Raise KVMismatchError unless every tensor has the header's shape and dtype."""
        h = self.header
        if len(self.keys) != h.num_layers or len(self.values) != h.num_layers:
            raise KVMismatchError(
                f"request {h.request_id}: header says {h.num_layers} layers, got {len(self.keys)} K and "
                f"{len(self.values)} V tensors"
            )
        want = TORCH_DTYPES[h.dtype]
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            for name, t in (("K", k), ("V", v)):
                if tuple(t.shape) != h.layer_shape or t.dtype != want:
                    raise KVMismatchError(
                        f"request {h.request_id}: layer {i} {name} is {tuple(t.shape)} {t.dtype}, "
                        f"header says {h.layer_shape} {want}"
                    )

    def check_compatible(self, *, model_id: str, num_layers: int, num_kv_heads: int, head_dim: int,
                         dtype: str) -> None:
        """Raise KVMismatchError when this payload cannot be imported by an engine of this shape."""
        h = self.header
        ours = (model_id, num_layers, num_kv_heads, head_dim, dtype)
        theirs = (h.model_id, h.num_layers, h.num_kv_heads, h.head_dim, h.dtype)
        if ours != theirs:
            raise KVMismatchError(
                f"request {h.request_id}: KV made for (model, layers, kv heads, head dim, dtype) = {theirs}, "
                f"this engine is {ours}"
            )
