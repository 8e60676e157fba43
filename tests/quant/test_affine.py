"""Tests of the group-wise affine reference (`kvpack.quant.affine`): error bounds, scale/zero rounding, layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.errors import KVPackError, NonFiniteError, ShapeError
from kvpack.quant.affine import (
    FP16_MAX,
    dequantize_groups,
    from_groups,
    quantize_groups,
    to_groups,
)
from tests.quant.tolerances import SCALE_RELATIVE_SLACK, max_abs_error

BITS = (2, 3, 4, 8)
GROUP_SIZES = (16, 32, 64, 128)
FP16_MIN_NORMAL = 2.0**-14  # below this float16 is subnormal
FP16_MIN_SUBNORMAL = 2.0**-24


def check_groups(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize groups along the last dim of `x`, check every invariant, return the float32 reconstruction."""
    q = quantize_groups(x, bits)
    qmax = (1 << bits) - 1
    assert q.codes.dtype == torch.uint8
    assert q.scale.dtype == torch.float16
    assert q.zero.dtype == torch.float16
    assert q.codes.shape == x.shape
    assert q.scale.shape == x.shape[:-1]
    assert q.zero.shape == x.shape[:-1]
    assert int(q.codes.max()) <= qmax

    x32 = x.float()
    low, high = x32.amin(-1), x32.amax(-1)
    # zero is the largest float16 <= the group's minimum (rounded down, never more than needed).
    assert torch.all(q.zero.float() <= low)
    assert torch.all(torch.nextafter(q.zero, torch.full_like(q.zero, torch.inf)).float() > low)

    # scale is positive and just covers the range: zero + qmax * scale >= max, while the next smaller
    # float16 would not. Compared in float64, within the float32 rounding of (max - zero) / qmax.
    span = high.double() - q.zero.double()
    needed = span / qmax
    scale64 = q.scale.double()
    assert torch.all(scale64 > 0)
    varying = span > 0
    smaller = torch.nextafter(q.scale, torch.zeros_like(q.scale)).double()
    assert torch.all((scale64 >= needed * (1 - SCALE_RELATIVE_SLACK))[varying])
    assert torch.all((smaller < needed * (1 + SCALE_RELATIVE_SLACK))[varying])

    x_hat = dequantize_groups(q.codes, q.scale, q.zero, torch.float32)
    assert x_hat.dtype == torch.float32
    bound = max_abs_error(q.scale.unsqueeze(-1), x_hat, bits)
    error = (x32.double() - x_hat.double()).abs()
    assert torch.all(error <= bound), f"max error / half step: {float((error / q.scale.double().unsqueeze(-1)).max())}"
    return x_hat


# ---------------------------------------------------------------------------------------------------------
# Error bound on ordinary and extreme data.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gaussian_groups_within_half_step(bits: int, group_size: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    x = (torch.randn(64, group_size, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(-1)).to(dtype)
    check_groups(x, bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1.0, -2.75, 1000.5, 0.0999755859375, 65504.0, -65504.0, FP16_MIN_SUBNORMAL, -3 * FP16_MIN_SUBNORMAL],
)
def test_constant_group_representable_in_float16_is_exact(bits: int, value: float) -> None:
    for dtype in (torch.float32, torch.float16):
        x = torch.full((2, 16), value, dtype=dtype)
        x_hat = check_groups(x, bits)
        assert torch.equal(x_hat, x.float())
        assert torch.all(quantize_groups(x, bits).codes == 0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [0.1, -0.1, 1 / 3, 1000.1, 1e-30, -1e-30, 3e-5])
def test_constant_group_not_representable_in_float16_within_half_step(bits: int, value: float) -> None:
    # The zero is float16 (rounded down), so a float32 constant that float16 cannot hold is reconstructed
    # from a tiny nonzero range: within half a (tiny) step, not necessarily exactly.
    check_groups(torch.full((2, 16), value), bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("offset", [1000.0, -1000.0, 30000.0, -65000.0])
def test_large_offset_narrow_range(bits: int, offset: float) -> None:
    g = torch.Generator().manual_seed(bits)
    x = offset + 1e-3 * torch.randn(8, 64, generator=g)
    # The zero is rounded down to float16's grid at the offset (spacing 0.5 at 1000, 32 at 65000), so the
    # step covers up to that spacing plus the 1e-3 noise; every element is still within half of it.
    check_groups(x, bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("magnitude", [1e-5, 1e-6, 1e-7, 1e-9])
def test_subnormal_scale(bits: int, magnitude: float) -> None:
    g = torch.Generator().manual_seed(bits)
    for center in (0.0, 0.5):
        x = center + magnitude * torch.randn(8, 32, generator=g)
        q = quantize_groups(x, bits)
        if center == 0.0:
            assert torch.all(q.scale.float() < FP16_MIN_NORMAL)  # the case under test: subnormal scales
        check_groups(x, bits)


@pytest.mark.parametrize("bits", BITS)
def test_mixed_signs_and_one_sided_groups(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    base = torch.randn(6, 32, generator=g)
    x = torch.stack(
        [
            base[0],  # straddles zero
            base[1].abs() + 0.25,  # all positive
            -base[2].abs() - 0.25,  # all negative
            base[3] - 100.0,  # negative offset, mixed magnitudes
            torch.where(base[4] > 0, 1e4, -1e-4),  # two clusters of very different magnitude
            torch.cat([torch.full((31,), -0.0), torch.tensor([5.0])]),  # one outlier among zeros
        ]
    )
    check_groups(x, bits)


@pytest.mark.parametrize("bits", BITS)
def test_full_float16_range(bits: int) -> None:
    x = torch.tensor(
        [
            [FP16_MAX, -FP16_MAX] + [0.0] * 14,
            [FP16_MAX] + [0.0] * 15,
            [-FP16_MAX] + [1.0] * 15,
            [FP16_MAX, 65000.0] + [64000.0] * 14,
        ]
    )
    check_groups(x, bits)


# Groups of 16 arbitrary float32 values in the float16 range: subnormals, mixed magnitudes, repeats.
FLOATS = st.floats(min_value=-FP16_MAX, max_value=FP16_MAX, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None, database=None)
@given(bits=st.sampled_from(BITS), values=st.lists(FLOATS, min_size=16, max_size=16))
def test_half_step_property(bits: int, values: list[float]) -> None:
    check_groups(torch.tensor([values], dtype=torch.float32), bits)


# ---------------------------------------------------------------------------------------------------------
# dequantize_groups.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_groups_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 4, 16), generator=g, dtype=torch.uint8)
    scale = torch.rand(3, 4, generator=g).to(torch.float16) + 0.01
    zero = torch.randn(3, 4, generator=g).to(torch.float16)
    expected = codes.float() * scale.float()[..., None] + zero.float()[..., None]
    out = dequantize_groups(codes, scale, zero, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, expected.to(dtype))


# ---------------------------------------------------------------------------------------------------------
# Non-finite and out-of-range input.


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 65504.01, -65505.0, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_or_out_of_range_raises(bad: float, dtype: torch.dtype) -> None:
    x = torch.randn(4, 32)
    x[2, 17] = bad
    x = x.to(dtype)  # bfloat16 rounds 65504.01 and -65505 to ±65536: still out of range
    with pytest.raises(NonFiniteError, match="65504") as info:
        quantize_groups(x, 4)
    assert isinstance(info.value, KVPackError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float16_raises(bad: float) -> None:
    x = torch.randn(4, 32).to(torch.float16)
    x[0, 0] = bad
    with pytest.raises(NonFiniteError):
        quantize_groups(x, 8)


def test_float16_max_is_accepted() -> None:
    x = torch.tensor([[FP16_MAX, -FP16_MAX] * 8])
    quantize_groups(x, 4)  # the boundary itself is in range
    just_above = torch.nextafter(torch.tensor(FP16_MAX), torch.tensor(torch.inf))
    with pytest.raises(NonFiniteError):
        quantize_groups(torch.cat([x[:, :-1], just_above.view(1, 1)], dim=-1), 4)


# ---------------------------------------------------------------------------------------------------------
# to_groups / from_groups: which elements share a group.


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_to_groups_token_axis_layout(group_size: int) -> None:
    tokens, channels = 3, 2 * group_size
    x = torch.arange(2 * tokens * channels).reshape(2, tokens, channels)
    groups = to_groups(x, group_size, "token")
    assert groups.shape == (2, tokens, channels // group_size, group_size)
    for t in range(tokens):
        for j in range(channels // group_size):
            assert torch.equal(groups[:, t, j], x[:, t, j * group_size : (j + 1) * group_size])
    assert torch.equal(from_groups(groups, "token"), x)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_to_groups_channel_axis_layout(group_size: int) -> None:
    tokens, channels = 2 * group_size, 5
    x = torch.arange(2 * tokens * channels).reshape(2, tokens, channels)
    groups = to_groups(x, group_size, "channel")
    assert groups.shape == (2, 2, channels, group_size)
    for b in range(2):
        for c in range(channels):
            assert torch.equal(groups[:, b, c], x[:, b * group_size : (b + 1) * group_size, c])
    assert torch.equal(from_groups(groups, "channel"), x)


def test_to_groups_non_contiguous() -> None:
    base = torch.arange(64 * 32).reshape(32, 64)
    x = base.t()  # [64 tokens, 32 channels], non-contiguous
    assert torch.equal(to_groups(x, 16, "token"), to_groups(x.contiguous(), 16, "token"))
    assert torch.equal(to_groups(x, 16, "channel"), to_groups(x.contiguous(), 16, "channel"))


@pytest.mark.parametrize(("channels", "group_size"), [(96, 64), (48, 32), (100, 16), (64, 128)])
def test_to_groups_token_axis_shape_error(channels: int, group_size: int) -> None:
    with pytest.raises(ShapeError, match="head_dim"):
        to_groups(torch.zeros(4, channels), group_size, "token")


@pytest.mark.parametrize(("tokens", "group_size"), [(100, 64), (65, 64), (16, 32), (1, 16)])
def test_to_groups_channel_axis_shape_error(tokens: int, group_size: int) -> None:
    with pytest.raises(ShapeError, match="multiple of"):
        to_groups(torch.zeros(tokens, 64), group_size, "channel")
