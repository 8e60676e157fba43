"""Tests of non-uniform codes (`kvpack.quant.codebooks`): the shipped tables, nearest-level coding, error bounds, the
uniform default's bit-exactness, and the `codebook` field's spec and JSON forms."""

from __future__ import annotations

import pytest
import torch

from kvpack.config import CacheConfig, QuantSpec, parse_spec
from kvpack.errors import ConfigError
from kvpack.quant.affine import dequantize_groups, quantize_groups
from kvpack.quant.codebooks import CODEBOOKS, FITTED_CODEBOOK, codebook_levels
from kvpack.quant.tensor import PackedTensor
from tests.helpers.quant import heavy_tailed
from tests.quant.tolerances import codebook_max_abs_error

FITTED = [c for c in CODEBOOKS if c != "uniform"]
WIDTHS = (2, 3, 4)
AXES = ("channel", "token")


@pytest.mark.parametrize("codebook", FITTED)
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("axis", AXES)
def test_levels_are_sorted_inside_the_range(codebook: str, bits: int, axis: str) -> None:
    levels = codebook_levels(codebook, bits, axis)
    assert levels is not None and levels.dtype == torch.float32 and levels.shape == (1 << bits,)
    assert torch.all(levels[1:] > levels[:-1])
    assert float(levels[0]) >= 0 and float(levels[-1]) <= (1 << bits) - 1


def test_uniform_has_no_table_and_the_fitted_codebook_is_known() -> None:
    assert codebook_levels("uniform", 4, "token") is None
    assert FITTED_CODEBOOK in CODEBOOKS


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_uniform_codes_are_todays_format_bit_for_bit(bits: int) -> None:
    """The default path is the affine format as it was: round((x - zero) / scale) from the float16 zero and scale."""
    x = heavy_tailed((7, 5, 64), seed=bits)
    q = quantize_groups(x, bits)
    qmax = (1 << bits) - 1
    steps = (x - q.zero.float().unsqueeze(-1)) / q.scale.float().unsqueeze(-1)
    assert torch.equal(q.codes, torch.round(steps).clamp(0, qmax).to(torch.uint8))
    spec = QuantSpec(bits, 64, "token")
    packed = PackedTensor.quantize(x.reshape(35, 64), spec)
    assert torch.equal(packed.dequantize(), dequantize_groups(q.codes, q.scale, q.zero, torch.float32).reshape(35, 64))


@pytest.mark.parametrize("bits", WIDTHS)
def test_an_identity_table_codes_as_uniform_rounding(bits: int) -> None:
    """Nearest-level coding through bucketize on a table level[c] = c is round-to-nearest (exact ties aside)."""
    x = heavy_tailed((50, 32), seed=10 + bits)
    identity = torch.arange(1 << bits, dtype=torch.float32)
    uniform, table = quantize_groups(x, bits), quantize_groups(x, bits, identity)
    assert torch.equal(uniform.scale, table.scale) and torch.equal(uniform.zero, table.zero)
    steps = (x - uniform.zero.float().unsqueeze(-1)) / uniform.scale.float().unsqueeze(-1)
    tie = (steps - steps.floor()) == 0.5
    assert torch.equal(uniform.codes[~tie], table.codes[~tie])


@pytest.mark.parametrize("codebook", FITTED)
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("axis", AXES)
def test_each_element_gets_its_nearest_level(codebook: str, bits: int, axis: str) -> None:
    levels = codebook_levels(codebook, bits, axis)
    assert levels is not None
    x = heavy_tailed((40, 3, 32), seed=bits)
    q = quantize_groups(x, bits, levels)
    steps = ((x - q.zero.float().unsqueeze(-1)) / q.scale.float().unsqueeze(-1)).double()
    distances = (steps.unsqueeze(-1) - levels.double()).abs()  # [..., g, levels]
    chosen = distances.gather(-1, q.codes.long().unsqueeze(-1)).squeeze(-1)
    # Float32 midpoints may move a boundary by one rounding (<= qmax * 2**-24 steps).
    assert torch.all(chosen <= distances.min(-1).values + (1 << bits) * 2.0**-23)


@pytest.mark.parametrize("codebook", FITTED)
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("seed", range(3))
def test_round_trip_error_is_within_half_the_widest_gap(codebook: str, bits: int, axis: str, seed: int) -> None:
    levels = codebook_levels(codebook, bits, axis)
    assert levels is not None
    x = heavy_tailed((8, 6, 64), seed=seed) * 10 ** (seed - 1)
    q = quantize_groups(x, bits, levels)
    assert int(q.codes.max()) < (1 << bits)
    x_hat = dequantize_groups(q.codes, q.scale, q.zero, torch.float32, levels)
    bound = codebook_max_abs_error(levels, q.scale.unsqueeze(-1), x_hat, bits)
    assert torch.all((x.double() - x_hat.double()).abs() <= bound)


@pytest.mark.parametrize("bits", WIDTHS)
def test_constant_groups_are_exact_with_a_codebook(bits: int) -> None:
    """A constant group stores scale 0 (the lowest level is not 0): every code reads back as its float16 value."""
    levels = codebook_levels(FITTED_CODEBOOK, bits, "token")
    x = torch.tensor([[3.25] * 16, [-0.0] * 16, [-65504.0] * 16, [2.0**-20] * 16])  # float16 values
    q = quantize_groups(x, bits, levels)
    assert torch.all(q.scale == 0)
    assert torch.equal(dequantize_groups(q.codes, q.scale, q.zero, torch.float32, levels), x)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("axis", AXES)
def test_packed_tensor_round_trip_with_a_codebook(bits: int, axis: str) -> None:
    """Through the PackedTensor layout (both axes, rotated or not): the same reconstruction as the group reference."""
    for rotation in ("none", "hadamard"):
        spec = QuantSpec(bits, 32, axis, rotation, FITTED_CODEBOOK)  # type: ignore[arg-type]
        x = heavy_tailed((2, 3, 64, 64), seed=bits)
        packed = PackedTensor.quantize(x, spec)
        assert packed.levels is not None
        uniform = PackedTensor.quantize(x, QuantSpec(bits, 32, axis, rotation))  # type: ignore[arg-type]
        assert packed.codes.shape == uniform.codes.shape and packed.nbytes == uniform.nbytes
        error = (packed.dequantize() - x).pow(2).sum()
        # Sanity, not a quality claim: the codebook's error is of the uniform one's order on heavy-tailed data.
        assert error < 2 * (uniform.dequantize() - x).pow(2).sum()


def test_codebook_at_8_bits_is_refused() -> None:
    with pytest.raises(ConfigError, match="8-bit"):
        QuantSpec(8, 64, "token", codebook=FITTED_CODEBOOK)
    with pytest.raises(ConfigError, match="codebook"):
        QuantSpec(4, 64, "token", codebook="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="8-bit"):
        parse_spec("k8v4-plain-cb")
    assert parse_spec("k8v4-plain-cbv").value.codebook == FITTED_CODEBOOK


@pytest.mark.parametrize(
    "spec",
    ["k4v2-plain-g64-r128-cb", "k4v4-plain-g64-r128-cbk", "k2v2-plain-g32-r64-s4-rot-cbv",
     "k2v3-plain-g64-r128-clip", "k4v4-plain-g64-r128-clipk", "k4v2-plain-g64-r128-clipv",
     "k2v2-plain-g64-r128-s4-rotk-cb-clip", "k8v4-plain-g64-r128-cbv-clipk"],
)  # fmt: skip
def test_spec_round_trip(spec: str) -> None:
    config = parse_spec(spec)
    assert config.spec == spec
    assert CacheConfig.from_dict(config.to_dict()) == config


def test_spec_options_set_the_fields() -> None:
    config = parse_spec("k4v2-plain-cbk-clipv")
    assert (config.key.codebook, config.value.codebook) == (FITTED_CODEBOOK, "uniform")
    assert (config.key.clip, config.value.clip) == (False, True)
    assert parse_spec("k4v4-plain").key.codebook == "uniform" and not parse_spec("k4v4-plain").value.clip
    old = CacheConfig().to_dict()  # a config saved before these fields existed reads as uniform, unclipped
    for spec in ("key", "value"):
        del old[spec]["codebook"], old[spec]["clip"]
    assert CacheConfig.from_dict(old) == CacheConfig()
    with pytest.raises(ConfigError, match="clip"):
        QuantSpec(clip=1)  # type: ignore[arg-type]
