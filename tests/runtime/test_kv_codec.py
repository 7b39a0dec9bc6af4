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


@pytest.mark.parametrize("codec", [Fp8Codec(16), Fp8Codec(5), RawCodec()], ids=["fp8-16", "fp8-5", "raw"])
@pytest.mark.parametrize("tokens", [1, 20])
def test_a_batch_of_layers_encodes_to_the_bytes_of_its_layers_one_by_one(codec, tokens):
    # A staged pull encodes and decodes all its layers at once; the wire bytes must not depend on that.
    from disagg_runtime.kv.staged import pack, pack_layers, unpack_layers

    p = make_payload("r", tokens=tokens, layers=3, heads=4, dim=16, dtype="bfloat16")
    keys, values = torch.stack(p.keys), torch.stack(p.values)
    batched = pack_layers(codec.encode_many(keys, values))
    one_by_one = torch.cat([pack(codec.encode(k, v)) for k, v in zip(p.keys, p.values, strict=True)])
    specs = codec.part_specs(p.header)
    per_layer = batched.numel() // 3
    offset = 0
    for s in specs:  # compare the parts' bytes (the padding between parts is unspecified)
        n = s.nbytes
        for i in range(3):
            at = i * per_layer + offset
            assert torch.equal(batched[at:at + n], one_by_one[at:at + n])
        offset += -(-n // 16) * 16
    k_many, v_many = codec.decode_many(unpack_layers(batched, 3, [(s.dtype, s.shape) for s in specs]), p.header)
    for i in range(3):
        parts = unpack_layers(one_by_one[i * per_layer:(i + 1) * per_layer], 1, [(s.dtype, s.shape) for s in specs])
        k, v = codec.decode([t[0] for t in parts], p.header)
        assert torch.equal(k_many[i], k) and torch.equal(v_many[i], v)
