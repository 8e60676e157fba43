"""Tests of `PackedTensor`: accuracy per element and in aggregate, documented layout, bytes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from kvpack.config import Axis, QuantSpec
from kvpack.errors import NonFiniteError, ShapeError
from kvpack.quant.tensor import PackedTensor
from tests.helpers.quant import assert_within_half_step, gaussian, reference_dequantize
from tests.quant.tolerances import SQNR_MIN_DB

BITS = (2, 3, 4, 8)
GROUP_SIZES = (16, 32, 64, 128)
AXES: tuple[Axis, ...] = ("token", "channel")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64 = x.double()
    return 10 * math.log10(float((x64**2).sum()) / float(((x64 - x_hat.double()) ** 2).sum()))


# ---------------------------------------------------------------------------------------------------------
# Accuracy.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_element_within_half_step(bits: int, group_size: int, axis: Axis, dtype: torch.dtype) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, axis=axis)
    # [batch, heads, tokens, head_dim]; channels of very different magnitudes, as keys have.
    x = gaussian((2, 2, 256, 128), seed=bits + group_size) * torch.logspace(-2, 2, 128)
    x = x.to(dtype)
    pt = PackedTensor.quantize(x, spec)
    assert pt.codes.dtype == torch.uint8
    assert pt.scale.dtype == torch.float16
    assert pt.zero.dtype == torch.float16
    assert pt.shape == x.shape
    assert_within_half_step(x.float(), pt)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sqnr_on_gaussian_data(bits: int, group_size: int, axis: Axis, dtype: torch.dtype) -> None:
    # Same shape and seed as the measurements behind SQNR_MIN_DB (see tolerances.py).
    x = gaussian((2, 4, 256, 128), seed=0, dtype=dtype)
    pt = PackedTensor.quantize(x, QuantSpec(bits=bits, group_size=group_size, axis=axis))
    assert sqnr_db(x.float(), pt.dequantize()) >= SQNR_MIN_DB[(bits, group_size)]


def test_sqnr_table_covers_every_supported_spec() -> None:
    assert set(SQNR_MIN_DB) == {(b, g) for b in BITS for g in GROUP_SIZES}


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_special_groups_side_by_side(axis: Axis, bits: int) -> None:
    g = 16
    noise = gaussian((3, g, g), seed=bits)
    kinds = [
        torch.full((g, g), -2.75),  # constant, float16-representable: exact
        1000.0 + 1e-3 * noise[0],  # large offset, narrow range
        1e-6 * noise[1],  # subnormal float16 scale
        noise[2] - 0.1,  # mixed signs
        torch.full((g, g), 3.0).index_fill_(0, torch.tensor([5]), -65504.0),  # extreme values
    ]
    # token axis: each kind fills one group of channels of every token; channel axis: one block of tokens.
    dim = -1 if axis == "token" else -2
    x = torch.cat(kinds, dim=dim)
    spec = QuantSpec(bits=bits, group_size=g, axis=axis)
    pt = PackedTensor.quantize(x, spec)
    assert_within_half_step(x, pt)
    x_hat = pt.dequantize()
    assert torch.equal(x_hat.narrow(dim, 0, g), kinds[0])
    # Each kind is reconstructed exactly as if quantized alone: no group sees another's range.
    for i, kind in enumerate(kinds):
        assert torch.equal(x_hat.narrow(dim, i * g, g), PackedTensor.quantize(kind, spec).dequantize())


# ---------------------------------------------------------------------------------------------------------
# Grouping axis: per-channel keys group along tokens.


@pytest.mark.parametrize("bits", BITS)
def test_outlier_channel_does_not_affect_other_channels(bits: int) -> None:
    x = gaussian((2, 128, 64), seed=bits)
    spiky = x.clone()
    # A fixed outlier channel, as keys have: 1000x the spread, offset so that every token's value is far
    # (>= ~5000) from the other channels' values too.
    spiky[..., 5] = spiky[..., 5] * 1000 + 10000
    others = torch.ones(64, dtype=torch.bool)
    others[5] = False

    per_channel = QuantSpec(bits=bits, group_size=32, axis="channel")
    clean = PackedTensor.quantize(x, per_channel)
    with_outlier = PackedTensor.quantize(spiky, per_channel)
    # Groups run along tokens within one channel, so the other channels are bit-identical.
    assert torch.equal(with_outlier.dequantize()[..., others], clean.dequantize()[..., others])
    assert torch.equal(with_outlier.scale[..., others], clean.scale[..., others])
    assert torch.all(with_outlier.scale[..., 5] > 100 * clean.scale[..., 5])

    # Grouped along channels instead, every token's group of channels 0..31 takes the outlier's step,
    # while channels 32..63 keep theirs.
    per_token = QuantSpec(bits=bits, group_size=32, axis="token")
    clean_t = PackedTensor.quantize(x, per_token)
    spiky_t = PackedTensor.quantize(spiky, per_token)
    assert torch.all(spiky_t.scale[..., 0] > 100 * clean_t.scale[..., 0])
    assert torch.equal(spiky_t.scale[..., 1], clean_t.scale[..., 1])


@pytest.mark.parametrize("bits", BITS)
def test_channel_axis_scale_and_zero_follow_token_blocks(bits: int) -> None:
    g = 32
    x = gaussian((3, 4 * g, 16), seed=bits)
    pt = PackedTensor.quantize(x, QuantSpec(bits=bits, group_size=g, axis="channel"))
    assert pt.scale.shape == pt.zero.shape == (3, 4, 16)
    blocks = x.reshape(3, 4, g, 16)  # [batch, block, token in block, channel]
    low = blocks.amin(dim=2)
    # zero[b, blk, c] is the largest float16 <= min over the tokens of that block and channel.
    assert torch.all(pt.zero.float() <= low)
    assert torch.all(torch.nextafter(pt.zero, torch.full_like(pt.zero, torch.inf)).float() > low)


@pytest.mark.parametrize("bits", BITS)
def test_token_axis_scale_and_zero_follow_channel_groups(bits: int) -> None:
    g = 32
    x = gaussian((3, 5, 4 * g), seed=bits)
    pt = PackedTensor.quantize(x, QuantSpec(bits=bits, group_size=g, axis="token"))
    assert pt.scale.shape == pt.zero.shape == (3, 5, 4)
    low = x.reshape(3, 5, 4, g).amin(dim=-1)
    assert torch.all(pt.zero.float() <= low)
    assert torch.all(torch.nextafter(pt.zero, torch.full_like(pt.zero, torch.inf)).float() > low)


# ---------------------------------------------------------------------------------------------------------
# Layout and bytes.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [16, 128])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("leading", [(), (3,), (2, 3)])
def test_dequantize_matches_documented_layout(bits: int, group_size: int, axis: Axis, leading: tuple[int, ...]) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, axis=axis)
    tokens, channels = 2 * group_size, 2 * group_size
    x = gaussian((*leading, tokens, channels), seed=bits)
    pt = PackedTensor.quantize(x, spec)
    if axis == "token":
        assert pt.codes.shape == (*leading, tokens, channels * bits // 8)
        assert pt.scale.shape == (*leading, tokens, channels // group_size)
    else:
        assert pt.codes.shape == (*leading, tokens // group_size, channels, group_size * bits // 8)
        assert pt.scale.shape == (*leading, tokens // group_size, channels)
    assert pt.zero.shape == pt.scale.shape
    assert torch.equal(pt.dequantize(), reference_dequantize(pt))


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_to_dtype_is_one_rounding_of_float32(axis: Axis, dtype: torch.dtype) -> None:
    pt = PackedTensor.quantize(gaussian((2, 64, 64), seed=1), QuantSpec(bits=4, group_size=32, axis=axis))
    out = pt.dequantize(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, pt.dequantize(torch.float32).to(dtype))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("leading", [(), (2, 3)])
def test_nbytes(bits: int, group_size: int, axis: Axis, leading: tuple[int, ...]) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, axis=axis)
    tokens, channels = 2 * group_size, 128
    pt = PackedTensor.quantize(torch.zeros(*leading, tokens, channels), spec)
    fields = (pt.codes, pt.scale, pt.zero)
    assert pt.nbytes == sum(t.numel() * t.element_size() for t in fields)
    rows = math.prod(leading)
    if axis == "token":  # per token: packed channels + one float16 scale and zero per group
        per_row = channels * bits // 8 + 2 * 2 * (channels // group_size)
        assert pt.nbytes == rows * tokens * per_row
    else:  # per (block, channel): packed group of tokens + one float16 scale and zero
        assert pt.nbytes == rows * (tokens // group_size) * channels * (group_size * bits // 8 + 2 * 2)
    # Either way: spec.bits_per_value bits per element.
    assert pt.nbytes * 8 == rows * tokens * channels * spec.bits_per_value


# ---------------------------------------------------------------------------------------------------------
# Inputs: dtypes and strides.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input_gives_identical_result(bits: int, axis: Axis, dtype: torch.dtype) -> None:
    spec = QuantSpec(bits=bits, group_size=32, axis=axis)
    base = gaussian((2, 64, 3, 96), seed=bits, dtype=dtype)
    views = [
        base.permute(0, 2, 1, 3),  # [2, 3, 64 tokens, 96 channels], heads-major view
        base.permute(0, 2, 3, 1).transpose(-1, -2),  # channels-major storage
        gaussian((2, 3, 128, 192), seed=bits, dtype=dtype)[..., ::2, ::2],  # strided slice
    ]
    for x in views:
        assert not x.is_contiguous()
        got = PackedTensor.quantize(x, spec)
        want = PackedTensor.quantize(x.contiguous(), spec)
        for name in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.shape == x.shape
        assert_within_half_step(x.float(), got)


# ---------------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 65505.0, -1e5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_or_out_of_float16_range_raises(axis: Axis, bad: float, dtype: torch.dtype) -> None:
    x = gaussian((2, 64, 64), seed=0)
    x[1, 40, 7] = bad
    x = x.to(dtype)  # float16 turns 65505 into 65504 (in range) and -1e5 into -inf
    spec = QuantSpec(bits=4, group_size=32, axis=axis)
    if dtype == torch.float16 and bad == 65505.0:
        PackedTensor.quantize(x, spec)  # 65504: the largest accepted value
        return
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        PackedTensor.quantize(x, spec)


@pytest.mark.parametrize(("channels", "group_size"), [(96, 64), (80, 32), (8, 16), (64, 128)])
def test_token_axis_head_dim_not_divisible_raises(channels: int, group_size: int) -> None:
    spec = QuantSpec(bits=4, group_size=group_size, axis="token")
    with pytest.raises(ShapeError, match="divisible"):
        PackedTensor.quantize(torch.zeros(2, 128, channels), spec)


@pytest.mark.parametrize(("tokens", "group_size"), [(100, 64), (1, 16), (48, 32), (64, 128)])
def test_channel_axis_tokens_not_multiple_raises(tokens: int, group_size: int) -> None:
    spec = QuantSpec(bits=4, group_size=group_size, axis="channel")
    with pytest.raises(ShapeError, match="multiple"):
        PackedTensor.quantize(torch.zeros(2, tokens, 128), spec)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
def test_float16_extremes_stay_finite_in_float16(bits: int, axis: Axis) -> None:
    x = torch.zeros(16, 16, dtype=torch.float16)
    x[3, 3] = 65504.0
    pt = PackedTensor.quantize(x, QuantSpec(bits=bits, group_size=16, axis=axis))
    assert torch.isfinite(pt.dequantize(torch.float16)).all()
