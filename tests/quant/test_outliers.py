"""Dense-and-sparse groups (`QuantSpec.outliers`): kept entries exact, the others within half of the (smaller) step,
the kept set the one that narrows the range most, exact bytes, and `outliers=0` unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvpack.config import Axis, CacheConfig, QuantSpec, parse_spec
from kvpack.errors import ConfigError, NonFiniteError, ShapeError
from kvpack.quant.affine import dequantize_groups, from_groups, quantize_groups, to_groups
from kvpack.quant.outliers import outlier_positions, split_outliers
from kvpack.quant.packing import pack, packed_row_bytes
from kvpack.quant.rotation import rotate
from kvpack.quant.tensor import PackedTensor
from tests.helpers.quant import gaussian, per_element, reference_dequantize
from tests.quant.tolerances import max_abs_error

AXES: tuple[Axis, ...] = ("token", "channel")


def spiky(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian data with a few large entries scattered over it, and channels of different magnitudes."""
    x = gaussian(shape, seed) * torch.logspace(-1, 1, shape[-1])
    g = torch.Generator().manual_seed(seed + 1)
    spikes = torch.rand(shape, generator=g) < 0.01
    x = torch.where(spikes, 50 * torch.randn(shape, generator=g), x)
    return x.to(dtype)


def outlier_mask(pt: PackedTensor) -> torch.Tensor:
    """Boolean `[..., tokens, channels]`: True where an entry is kept as an outlier, from the documented fields."""
    assert pt.outlier_positions is not None
    g = pt.spec.group_size
    in_group = torch.zeros((*pt.scale.shape, g), dtype=torch.bool)
    in_group.scatter_(-1, pt.outlier_positions.long(), True)
    if pt.spec.axis == "token":  # [..., T, C/g, g] -> [..., T, C]
        return in_group.flatten(-2)
    return in_group.transpose(-1, -2).flatten(-3, -2)  # [..., T/g, C, g] -> [..., T/g, g, C] -> [..., T, C]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("outliers", [1, 2, 4])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kept_entries_are_exact_and_the_others_within_half_a_step(
    bits: int, outliers: int, axis: Axis, dtype: torch.dtype
) -> None:
    x = spiky((2, 3, 64, 64), seed=bits * 10 + outliers, dtype=dtype)
    spec = QuantSpec(bits=bits, group_size=16, axis=axis, outliers=outliers)
    pt = PackedTensor.quantize(x, spec)
    assert pt.outlier_values is not None and pt.outlier_positions is not None
    assert pt.outlier_values.dtype == torch.float16 and pt.outlier_positions.dtype == torch.uint8
    assert pt.outlier_values.shape == pt.outlier_positions.shape == (*pt.scale.shape, outliers)
    assert bool((pt.outlier_positions.diff(dim=-1) > 0).all()) and int(pt.outlier_positions.max()) < 16
    x_hat = pt.dequantize(torch.float32)
    kept = outlier_mask(pt)
    assert int(kept.sum()) == pt.scale.numel() * outliers
    # Kept entries: the input rounded to float16, exactly (exact for float16 input).
    assert torch.equal(x_hat[kept], x.float()[kept].half().float())
    if dtype == torch.float16:
        assert torch.equal(x_hat[kept], x.float()[kept])
    # The others: the affine reconstruction of the documented fields, within half of their group's step.
    assert torch.equal(x_hat[~kept], reference_dequantize(pt)[~kept])
    bound = max_abs_error(per_element(pt.scale, spec), x_hat, bits)
    error = (x.double() - x_hat.double()).abs()
    assert torch.all(error[~kept] <= bound[~kept]), f"worst error / bound: {float((error / bound)[~kept].max())}"


@pytest.mark.parametrize("axis", AXES)
def test_the_step_only_shrinks_and_the_error_with_it(axis: Axis) -> None:
    x = spiky((2, 2, 128, 64), seed=3)
    errors = []
    plain = PackedTensor.quantize(x, QuantSpec(bits=3, group_size=32, axis=axis))
    for outliers in (0, 1, 2, 4):
        pt = PackedTensor.quantize(x, QuantSpec(bits=3, group_size=32, axis=axis, outliers=outliers))
        # The remaining entries are a subset of the group: their range, hence the step, is no wider.
        assert torch.all(pt.scale <= plain.scale)
        errors.append(float(((pt.dequantize() - x) ** 2).mean()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4, errors


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_kept_set_leaves_the_narrowest_range_of_all_subsets(count: int) -> None:
    groups = spiky((40, 16), seed=count)
    groups[0] = 1.0  # a constant group
    groups[1, :8] = -2.0  # ties
    positions = outlier_positions(groups, count)
    for group, chosen in zip(groups, positions, strict=True):

        def spread(removed: tuple[int, ...], group: torch.Tensor = group) -> float:
            rest = group[[i for i in range(16) if i not in removed]]
            return float(rest.max() - rest.min())  # float32, as the selection computes it

        best = min(spread(subset) for subset in itertools.combinations(range(16), count))
        assert spread(tuple(int(p) for p in chosen)) == best
        assert len(set(chosen.tolist())) == count


def test_scale_and_zero_come_from_the_remaining_entries_only() -> None:
    groups = spiky((8, 5, 32), seed=7)
    split = split_outliers(groups, 2)
    remaining = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, split.positions.long(), False)
    assert torch.equal(split.rest.amin(-1), torch.where(remaining, groups, torch.inf).amin(-1))
    assert torch.equal(split.rest.amax(-1), torch.where(remaining, groups, -torch.inf).amax(-1))
    assert torch.equal(torch.where(remaining, split.rest, 0), torch.where(remaining, groups, 0))


@pytest.mark.parametrize("axis", AXES)
def test_rotated_outliers_are_entries_of_the_stored_tensor(axis: Axis) -> None:
    x = spiky((1, 2, 64, 64), seed=5)
    pt = PackedTensor.quantize(x, QuantSpec(bits=2, group_size=16, axis=axis, rotation="hadamard", outliers=2))
    kept = outlier_mask(pt)
    stored = pt.dequantize_rotated(torch.float32)
    assert torch.equal(stored[kept], rotate(x, "hadamard")[kept].half().float())
    plain = PackedTensor.quantize(x, QuantSpec(bits=2, group_size=16, axis=axis, rotation="hadamard"))
    assert float(((pt.dequantize() - x) ** 2).mean()) < float(((plain.dequantize() - x) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", AXES)
def test_no_outliers_is_the_format_without_them(bits: int, axis: Axis) -> None:
    x = spiky((2, 2, 64, 32), seed=bits)
    spec = QuantSpec(bits=bits, group_size=16, axis=axis)
    pt = PackedTensor.quantize(x, spec)
    assert pt.outlier_values is None and pt.outlier_positions is None and pt.spec.outliers == 0
    assert list(pt.parts()) == ["codes", "scale", "zero"]
    # Bit for bit what the affine reference and the packer give, as before outliers existed.
    groups = quantize_groups(to_groups(x, 16, axis), bits)
    codes = from_groups(groups.codes, "token") if axis == "token" else groups.codes
    assert torch.equal(pt.codes, pack(codes, bits))
    assert torch.equal(pt.scale, groups.scale) and torch.equal(pt.zero, groups.zero)
    values = dequantize_groups(groups.codes, groups.scale, groups.zero, torch.float16)
    assert torch.equal(pt.dequantize(torch.float16), from_groups(values, axis))
    assert pt.nbytes == sum(t.numel() * t.element_size() for t in (pt.codes, pt.scale, pt.zero))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("outliers", [0, 1, 2, 4])
@pytest.mark.parametrize("axis", AXES)
def test_nbytes_counts_codes_scales_zeros_and_outliers_exactly(bits: int, outliers: int, axis: Axis) -> None:
    batch, heads, tokens, channels, g = 2, 3, 64, 64, 32
    spec = QuantSpec(bits=bits, group_size=g, axis=axis, outliers=outliers)
    pt = PackedTensor.quantize(spiky((batch, heads, tokens, channels), seed=1), spec)
    groups = batch * heads * tokens * channels // g
    if axis == "token":
        code_bytes = batch * heads * tokens * packed_row_bytes(channels, bits)
    else:
        code_bytes = batch * heads * (tokens // g) * channels * packed_row_bytes(g, bits)
    # codes + float16 scale and zero per group + per outlier a float16 value and a uint8 position.
    assert pt.nbytes == code_bytes + groups * (2 + 2) + groups * outliers * (2 + 1)
    assert pt.nbytes * 8 == batch * heads * tokens * channels * spec.bits_per_value


@pytest.mark.parametrize("axis", AXES)
def test_slices_hold_the_outliers_of_their_tokens(axis: Axis) -> None:
    x = spiky((2, 2, 96, 32), seed=9)
    pt = PackedTensor.quantize(x, QuantSpec(bits=2, group_size=16, axis=axis, outliers=2))
    whole = pt.dequantize()
    for start, end in ((0, 16), (16, 48), (32, 96), (80, 96)):
        part = pt.slice_tokens(start, end)
        assert part.shape[-2] == end - start
        assert torch.equal(part.dequantize(), whole[:, :, start:end])
        assert torch.equal(part.dequantize(), PackedTensor.quantize(x[:, :, start:end], pt.spec).dequantize())


def test_non_finite_entries_are_refused_even_as_outliers() -> None:
    spec = QuantSpec(bits=4, group_size=16, axis="token", outliers=2)
    for bad in (float("nan"), float("inf"), 1e6):
        x = torch.randn(1, 1, 4, 32)
        x[0, 0, 2, 3] = bad
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            PackedTensor.quantize(x, spec)


def test_packed_tensor_needs_its_outliers_exactly_when_the_spec_keeps_them() -> None:
    pt = PackedTensor.quantize(torch.randn(1, 1, 4, 32), QuantSpec(bits=4, group_size=16, outliers=1))
    with pytest.raises(ShapeError, match="outlier_values"):
        PackedTensor(pt.codes, pt.scale, pt.zero, pt.shape, pt.spec)
    plain = QuantSpec(bits=4, group_size=16)
    with pytest.raises(ShapeError, match="outlier_values"):
        PackedTensor(pt.codes, pt.scale, pt.zero, pt.shape, plain, pt.outlier_values, pt.outlier_positions)


# -- configuration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical", "key", "value"),
    [
        ("k2v2-plain-o1", "k2v2-plain-g64-r128-o1", 1, 1),
        ("k4v4-plain-ok2", "k4v4-plain-g64-r128-ok2", 2, 0),
        ("k4v4-plain-ov4-g16", "k4v4-plain-g16-r128-ov4", 0, 4),
        ("k2v3-plain-ok1-ov2-rot", "k2v3-plain-g64-r128-rot-ok1-ov2", 1, 2),
        ("k2v2-plain-o2-ok1", "k2v2-plain-g64-r128-ok1-ov2", 1, 2),
        ("k2v2-plain-o0", "k2v2-plain-g64-r128", 0, 0),
    ],
)
def test_spec_strings_round_trip(spec: str, canonical: str, key: int, value: int) -> None:
    config = parse_spec(spec)
    assert (config.key.outliers, config.value.outliers) == (key, value)
    assert config.spec == canonical
    assert parse_spec(config.spec) == config
    assert CacheConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["key"]["outliers"] == key


def test_a_dict_without_outliers_reads_as_none() -> None:
    data = CacheConfig().to_dict()
    del data["key"]["outliers"], data["value"]["outliers"]
    assert CacheConfig.from_dict(data) == CacheConfig()


@pytest.mark.parametrize("outliers", [-1, 16, 100, True, 1.0, "1"])
def test_bad_outlier_counts_are_refused(outliers: object) -> None:
    with pytest.raises(ConfigError, match="outliers"):
        QuantSpec(bits=4, group_size=16, outliers=outliers)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["k4v4-plain-g16-o16", "k4v4-plain-o64", "k4v4-plain-gk16-ok20"])
def test_spec_strings_with_too_many_outliers_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="outliers"):
        parse_spec(spec)


def test_bits_per_value_counts_each_outliers_value_and_position() -> None:
    assert QuantSpec(bits=2, group_size=64).bits_per_value == 2.5
    assert QuantSpec(bits=2, group_size=64, outliers=1).bits_per_value == 2.5 + 24 / 64
    assert QuantSpec(bits=4, group_size=32, outliers=4).bits_per_value == 4 + (32 + 4 * 24) / 32
