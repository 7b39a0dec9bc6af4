"""Per-layer wire encodings of K and V: raw, or FP8 e4m3 with one scale per (token block, KV head).

FP8 halves the bytes of a bf16/fp16 KV cache. Scales are taken per block of `block_tokens` tokens and per
head because KV magnitudes differ a lot between heads (outlier channels) but little within a short run of
tokens; that keeps the error of every element within 2^-4 of its block's largest magnitude.

Both codecs also work on a batch of layers at once (`encode_many` / `decode_many`, K and V of shape
(layers, tokens, heads, dim)): a staged payload is encoded and decoded in a handful of tensor ops, not a
handful per layer (on a GPU, per-layer FP8 of a 32-layer pull was ~1,300 small kernel launches, ~24 ms).
The math is elementwise the same, so a batch encodes to the same bytes as its layers one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .payload import TORCH_DTYPES, KVHeader

CodecName = Literal["none", "fp8"]

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Relative rounding error of e4m3 for normal values: 3 mantissa bits -> half an ulp = 2^-4.
FP8_REL_ERROR = 2.0**-4
# Absolute rounding error in the subnormal range, in units of the scale: half the smallest step 2^-9.
FP8_SUBNORMAL_ABS_ERROR = 2.0**-10


@dataclass(frozen=True)
class PartSpec:
    """Shape and dtype of one tensor of an encoded layer, as the receiver expects it."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    def to_wire(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}

    @classmethod
    def of(cls, t: torch.Tensor) -> PartSpec:
        return cls(t.dtype, tuple(t.shape))


class LayerCodec(Protocol):
    """Turns one layer's (K, V) into wire tensors and back."""

    name: CodecName

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]: ...

    def encode_many(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """`encode` of layers stacked on a leading dim: each part gains that dim."""
        ...

    def part_specs(self, header: KVHeader) -> list[PartSpec]: ...

    def decode(self, parts: list[torch.Tensor], header: KVHeader) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_many(self, parts: list[torch.Tensor], header: KVHeader) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` of parts stacked on a leading layer dim: K and V of shape (layers, tokens, heads, dim)."""
        ...


class RawCodec:
    """K and V as they are: bit-exact."""

    name: CodecName = "none"

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [k.contiguous(), v.contiguous()]

    def encode_many(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [k, v]

    def part_specs(self, header: KVHeader) -> list[PartSpec]:
        spec = PartSpec(TORCH_DTYPES[header.dtype], header.layer_shape)
        return [spec, spec]

    def decode(self, parts: list[torch.Tensor], header: KVHeader) -> tuple[torch.Tensor, torch.Tensor]:
        return parts[0], parts[1]

    def decode_many(self, parts: list[torch.Tensor], header: KVHeader) -> tuple[torch.Tensor, torch.Tensor]:
        return parts[0], parts[1]


class Fp8Codec:
    """e4m3 values plus float32 scales of shape (token blocks, heads); lossy within FP8_REL_ERROR."""

    name: CodecName = "fp8"

    def __init__(self, block_tokens: int = 16) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, h, d) -> e4m3 of the same shape and float32 scales of shape (ceil(n / block_tokens), h)."""
        q, scale = self.quantize_many(x.unsqueeze(0))
        return q[0], scale[0]

    def quantize_many(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, n, h, d) -> e4m3 of the same shape and float32 scales of shape (L, ceil(n / block_tokens), h)."""
        layers, n, h, d = x.shape
        nb = self._blocks(n)
        xf = x.to(torch.float32)
        if nb * self.block_tokens != n:
            xf = torch.cat([xf, xf.new_zeros(layers, nb * self.block_tokens - n, h, d)], dim=1)
        xb = xf.view(layers, nb, self.block_tokens, h, d)
        amax = xb.abs().amax(dim=(2, 4))
        # An all-zero block still needs a finite, non-zero scale so that decoding gives zeros, not NaNs.
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (xb / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.view(layers, nb * self.block_tokens, h, d)[:, :n].contiguous(), scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_many(q.unsqueeze(0), scale.unsqueeze(0), num_tokens, dtype)[0]

    def dequantize_many(self, q: torch.Tensor, scale: torch.Tensor, num_tokens: int,
                        dtype: torch.dtype) -> torch.Tensor:
        """(L, n, h, d) e4m3 and (L, blocks, h) scales -> (L, n, h, d) of `dtype`, contiguous."""
        layers, nb, h = scale.shape
        # Each block's scale repeated over its tokens by a broadcast view (repeat_interleave may sync a GPU).
        per_token = scale[:, :, None, :].expand(layers, nb, self.block_tokens, h).reshape(layers, -1, h)
        return (q.to(torch.float32) * per_token[:, :num_tokens, :, None]).to(dtype).contiguous()

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        kq, ks = self.quantize(k)
        vq, vs = self.quantize(v)
        return [kq, ks, vq, vs]

    def encode_many(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        kq, ks = self.quantize_many(k)
        vq, vs = self.quantize_many(v)
        return [kq, ks, vq, vs]

    def part_specs(self, header: KVHeader) -> list[PartSpec]:
        n, h, d = header.layer_shape
        nb = self._blocks(n)
        q = PartSpec(FP8, (n, h, d))
        s = PartSpec(torch.float32, (nb, h))
        return [q, s, q, s]

    def decode(self, parts: list[torch.Tensor], header: KVHeader) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = TORCH_DTYPES[header.dtype]
        kq, ks, vq, vs = parts
        return (self.dequantize(kq, ks, header.num_tokens, dtype),
                self.dequantize(vq, vs, header.num_tokens, dtype))

    def decode_many(self, parts: list[torch.Tensor], header: KVHeader) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = TORCH_DTYPES[header.dtype]
        kq, ks, vq, vs = parts
        return (self.dequantize_many(kq, ks, header.num_tokens, dtype),
                self.dequantize_many(vq, vs, header.num_tokens, dtype))


def make_codec(name: CodecName, *, block_tokens: int = 16) -> LayerCodec:
    """The codec called `name` ("none" or "fp8")."""
    if name == "none":
        return RawCodec()
    if name == "fp8":
        return Fp8Codec(block_tokens)
    raise ValueError(f"unknown KV compression {name!r}: use 'none' or 'fp8'")
