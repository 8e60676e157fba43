"""Tests of MSE-optimal clipping (`quantize_groups(..., clip=True)`): never worse than the min/max range, exact on
constant groups, the half-step bound inside the chosen range, and a real gain on heavy-tailed data."""

from __future__ import annotations

import pytest
import torch

from kvpack.errors import NonFiniteError
from kvpack.quant.affine import CLIP_CUTS, dequantize_groups, quantize_groups
from kvpack.quant.codebooks import FITTED_CODEBOOK, codebook_levels
from tests.helpers.quant import heavy_tailed
from tests.quant.tolerances import max_abs_error

BITS = (2, 3, 4, 8)


def group_sse(x: torch.Tensor, bits: int, levels: torch.Tensor | None, clip: bool) -> torch.Tensor:
    """Each group's squared reconstruction error, in float32 as the search computes it."""
    q = quantize_groups(x, bits, levels, clip)
    return ((dequantize_groups(q.codes, q.scale, q.zero, torch.float32, levels) - x) ** 2).sum(-1)


def tables(bits: int) -> list[torch.Tensor | None]:
    return [None] if bits == 8 else [None, codebook_levels(FITTED_CODEBOOK, bits, "token")]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("seed", range(3))
def test_clip_never_increases_a_groups_error(bits: int, seed: int) -> None:
    x = heavy_tailed((300, 32), seed=seed) * 10 ** (seed - 1)
    for levels in tables(bits):
        clipped, full = group_sse(x, bits, levels, True), group_sse(x, bits, levels, False)
        assert torch.all(clipped <= full)
        # With outliers the search finds real gains at low widths (measured: total error x0.54-0.95 uniform, x0.91-0.99
        # with the fitted codebook, whose outer levels already sit inside the range).
        if bits <= 4:
            assert float(clipped.sum()) < (0.97 if levels is None else 1.0) * float(full.sum())


@pytest.mark.parametrize("bits", BITS)
def test_clip_keeps_the_half_step_bound_inside_the_chosen_range(bits: int) -> None:
    """Elements inside [zero, zero + qmax * scale] are within half a step; those outside get an end code."""
    x = heavy_tailed((200, 64), seed=5)
    q = quantize_groups(x, bits, clip=True)
    qmax = (1 << bits) - 1
    x_hat = dequantize_groups(q.codes, q.scale, q.zero, torch.float32)
    steps = (x - q.zero.float().unsqueeze(-1)) / q.scale.float().unsqueeze(-1)
    inside = (steps >= 0) & (steps <= qmax)
    bound = max_abs_error(q.scale.unsqueeze(-1), x_hat, bits).expand_as(x_hat)
    assert torch.all((x.double() - x_hat.double()).abs()[inside] <= bound[inside])
    assert torch.all(q.codes[steps < 0] == 0) and torch.all(q.codes[steps > qmax] == qmax)
    if bits <= 4:  # (at 8 bits the full range is already best for these groups: nothing to clip)
        assert bool((~inside).any())


@pytest.mark.parametrize("bits", BITS)
def test_constant_and_tiny_groups(bits: int) -> None:
    constant = torch.full((4, 16), 3.25)
    constant[1] = -0.0
    constant[2] = 65504.0
    for levels in tables(bits):
        q = quantize_groups(constant, bits, levels, clip=True)
        assert torch.equal(dequantize_groups(q.codes, q.scale, q.zero, torch.float32, levels), constant)
        assert torch.all(q.scale == (1 if levels is None else 0))  # (a codebook's level 0 need not be 0)
    one = heavy_tailed((30, 1), seed=1)  # every candidate range is the same single point: clipping changes nothing
    clipped, plain = quantize_groups(one, bits, clip=True), quantize_groups(one, bits)
    assert torch.equal(clipped.codes, plain.codes) and torch.equal(clipped.scale, plain.scale)
    assert torch.equal(clipped.zero, plain.zero)
    two = heavy_tailed((30, 2), seed=2)
    for levels in tables(bits):
        assert torch.all(group_sse(two, bits, levels, True) <= group_sse(two, bits, levels, False))
    empty = torch.empty(0, 16)
    assert quantize_groups(empty, bits, clip=True).codes.shape == (0, 16)


def test_clip_candidates_start_with_the_full_range() -> None:
    assert CLIP_CUTS[0] == (0.0, 0.0)
    assert all(0 <= low < 0.5 and 0 <= high < 0.5 for low, high in CLIP_CUTS)


def test_clip_still_refuses_non_finite_values() -> None:
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        quantize_groups(x, 4, clip=True)
