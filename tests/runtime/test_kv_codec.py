"""FP8 (e4m3, per token-block and head scales) KV compression: asserted error bounds."""

from __future__ import annotations

import pytest
import torch
from disagg_runtime.kv.codec import FP8_REL_ERROR, FP8_SUBNORMAL_ABS_ERROR, Fp8Codec, RawCodec, make_codec
from disagg_runtime.kv.testing import make_payload


def kv_like(tokens: int, heads: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values with per-head magnitudes spanning 4 decades and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, dim, generator=g)
    x *= torch.logspace(-2, 2, heads)[None, :, None]
    x[:, :, 3] *= 20
    return x


@pytest.mark.parametrize("block_tokens", [1, 16, 64])
@pytest.mark.parametrize("tokens", [1, 17, 100])
def test_fp8_elementwise_error_within_e4m3_rounding(tokens, block_tokens):
    codec = Fp8Codec(block_tokens)
    x = kv_like(tokens, heads=4, dim=16)
    q, scale = codec.quantize(x)
    y = codec.dequantize(q, scale, tokens, torch.float32)
    assert y.shape == x.shape
    per_elem_scale = scale.repeat_interleave(block_tokens, 0)[:tokens][:, :, None]
    bound = FP8_REL_ERROR * x.abs() + FP8_SUBNORMAL_ABS_ERROR * per_elem_scale + 1e-12
    assert bool(((y - x).abs() <= bound).all())
    # Rounding is to nearest: the mean error is far below the worst case.
    assert float(((y - x).abs() / (x.abs() + per_elem_scale)).mean()) < FP8_REL_ERROR / 2


def test_fp8_scales_are_per_head_so_small_heads_keep_precision():
    x = kv_like(32, heads=4, dim=16)
    codec = Fp8Codec(16)
    y = codec.dequantize(*codec.quantize(x), 32, torch.float32)
    small = x[:, 0]  # the head with values ~1e-2 next to a head with values ~1e2
    assert float((y[:, 0] - small).abs().max()) <= FP8_REL_ERROR * float(small.abs().max())


def test_fp8_all_zero_block_decodes_to_zeros():
    codec = Fp8Codec(4)
    x = torch.zeros(8, 2, 4)
    x[4:] = 1.5
    y = codec.dequantize(*codec.quantize(x), 8, torch.float32)
    assert torch.equal(y, x)


def test_fp8_layer_codec_round_trip_bf16_and_sizes():
    p = make_payload(tokens=50, heads=2, dim=64, dtype="bfloat16")
    codec = Fp8Codec(16)
    parts = codec.encode(p.keys[0], p.values[0])
    specs = codec.part_specs(p.header)
    assert [tuple(t.shape) for t in parts] == [s.shape for s in specs]
    assert [t.dtype for t in parts] == [s.dtype for s in specs]
    wire = sum(s.nbytes for s in specs)
    assert wire < 0.6 * p.header.layer_nbytes  # 1 byte per value + 4-byte scales per 16x1 block
    k, v = codec.decode(parts, p.header)
    assert k.dtype == torch.bfloat16 and k.shape == p.keys[0].shape
    for got, want in ((k, p.keys[0]), (v, p.values[0])):
        err = (got.float() - want.float()).abs()
        # e4m3 rounding plus the final rounding back to bf16 (2^-8 relative).
        assert bool((err <= (FP8_REL_ERROR + 2.0**-8) * want.float().abs() + 1e-3).all())


def test_raw_codec_is_identity_and_unknown_codec_is_refused():
    p = make_payload()
    k, v = RawCodec().decode(RawCodec().encode(p.keys[1], p.values[1]), p.header)
    assert torch.equal(k, p.keys[1]) and torch.equal(v, p.values[1])
    with pytest.raises(ValueError, match="unknown KV compression 'zstd'"):
        make_codec("zstd")  # type: ignore[arg-type]
