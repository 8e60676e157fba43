"""Property tests (hypothesis) of `PackedTensor` quantization on random shapes, specs, dtypes and hard values.

Every drawn tensor mixes, group by group: Gaussian groups at magnitudes from 1e-6 to 1e4 (a huge dynamic range across
groups), constant groups, groups of float16 subnormals (and float32 subnormals), groups that span almost the whole
float16 range (|x| up to 65504 next to 1e-3), one-sided groups far from zero, and mixed signs everywhere. Properties:
  - every element comes back within half a step of its group's stored scale (`tolerances.max_abs_error`), and the
    reconstruction in the model dtype is finite;
  - the documented layout and byte count hold;
  - quantization is group-local: quantizing two token ranges split at a group boundary gives the same codes,
    scales and zeros as quantizing the whole (what lets the cache pack block by block);
  - a single NaN, ±Inf or |x| > 65504 anywhere raises `NonFiniteError` (the documented policy), whatever the rest.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.config import Axis, QuantSpec
from kvpack.errors import NonFiniteError
from kvpack.quant.affine import FP16_MAX
from kvpack.quant.packing import packed_row_bytes
from kvpack.quant.tensor import PackedTensor
from tests.helpers.quant import assert_within_half_step, per_element

BITS = (2, 3, 4, 8)
AXES: tuple[Axis, ...] = ("token", "channel")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest magnitude each dtype can hold within float16's range (bfloat16 rounds 65504 up to 65536).
DTYPE_MAX = {torch.float32: FP16_MAX, torch.float16: FP16_MAX, torch.bfloat16: 65280.0}
KINDS = ("gaussian", "constant", "fp16_subnormal", "fp32_subnormal", "wide", "one_sided")

SETTINGS = settings(max_examples=150, deadline=None, database=None)


@st.composite
def hard_tensors(draw: st.DrawFn) -> tuple[torch.Tensor, QuantSpec]:
    """A `[*lead, tokens, channels]` tensor in a random dtype, its groups drawn from `KINDS`, and a spec for it."""
    spec = QuantSpec(
        bits=draw(st.sampled_from(BITS)), group_size=draw(st.sampled_from((16, 32))), axis=draw(st.sampled_from(AXES))
    )
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    if spec.axis == "token":
        tokens, channels = draw(st.integers(1, 9)), spec.group_size * draw(st.integers(1, 3))
    else:
        tokens, channels = spec.group_size * draw(st.integers(1, 2)), draw(st.integers(1, 9))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=len(KINDS), unique=True))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    shape = (*lead, tokens, channels)
    g = spec.group_size
    params = (*lead, tokens, channels // g) if spec.axis == "token" else (*lead, tokens // g, channels)
    # One kind per group, broadcast to its elements.
    kind = per_element(torch.randint(0, len(kinds), params, generator=gen), spec)
    magnitude = per_element(10.0 ** torch.randint(-6, 5, params, generator=gen).float(), spec)
    constant = torch.randn(params, generator=gen) * 10.0 ** torch.randint(-8, 4, params, generator=gen)
    constant = per_element(constant, spec)
    signs = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    candidates = {
        "gaussian": torch.randn(shape, generator=gen) * magnitude,
        "constant": constant,
        "fp16_subnormal": signs * torch.rand(shape, generator=gen) * 2.0**-14,
        "fp32_subnormal": signs * torch.rand(shape, generator=gen) * 2.0**-126,
        "wide": torch.where(
            torch.rand(shape, generator=gen) < 0.5, signs * 6.0e4 * torch.rand(shape, generator=gen), signs * 1e-3
        ),
        "one_sided": 3e4 + torch.rand(shape, generator=gen),
    }
    x = torch.zeros(shape)
    for i, name in enumerate(kinds):
        x = torch.where(kind == i, candidates[name], x)
    limit = DTYPE_MAX[dtype]
    return x.clamp(-limit, limit).to(dtype), spec


@SETTINGS
@given(case=hard_tensors())
def test_every_element_within_half_a_step_and_finite_in_the_model_dtype(case: tuple[torch.Tensor, QuantSpec]) -> None:
    x, spec = case
    packed = PackedTensor.quantize(x, spec)
    assert_within_half_step(x.float(), packed)
    assert bool(torch.isfinite(packed.dequantize(x.dtype)).all())
    assert packed.dequantize(x.dtype).shape == x.shape


@SETTINGS
@given(case=hard_tensors())
def test_layout_and_bytes_are_as_documented(case: tuple[torch.Tensor, QuantSpec]) -> None:
    x, spec = case
    packed = PackedTensor.quantize(x, spec)
    *lead, tokens, channels = x.shape
    g = spec.group_size
    if spec.axis == "token":
        codes_shape = (*lead, tokens, packed_row_bytes(channels, spec.bits))
        params_shape = (*lead, tokens, channels // g)
    else:
        codes_shape = (*lead, tokens // g, channels, packed_row_bytes(g, spec.bits))
        params_shape = (*lead, tokens // g, channels)
    assert tuple(packed.codes.shape) == codes_shape and packed.codes.dtype == torch.uint8
    assert tuple(packed.scale.shape) == tuple(packed.zero.shape) == params_shape
    assert packed.scale.dtype == packed.zero.dtype == torch.float16
    n_params = packed.scale.numel()
    assert packed.nbytes == packed.codes.numel() + 4 * n_params


@SETTINGS
@given(case=hard_tensors(), cut=st.integers(0, 2**16))
def test_quantization_is_group_local_along_tokens(case: tuple[torch.Tensor, QuantSpec], cut: int) -> None:
    x, spec = case
    unit = spec.group_size if spec.axis == "channel" else 1
    units = x.shape[-2] // unit
    split = (cut % (units + 1)) * unit
    whole = PackedTensor.quantize(x, spec)
    dim = x.dim() - 2  # the token (or token-block) dimension of codes, scales and zeros
    parts = [PackedTensor.quantize(p, spec) for p in (x[..., :split, :], x[..., split:, :]) if p.shape[-2]]
    for field in ("codes", "scale", "zero"):
        joined = torch.cat([getattr(p, field) for p in parts], dim=dim)
        assert torch.equal(joined, getattr(whole, field)), field


@SETTINGS
@given(
    case=hard_tensors(),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), 65536.0, -1e6]),
    where=st.integers(0, 2**16),
)
def test_any_non_finite_or_out_of_range_value_raises(
    case: tuple[torch.Tensor, QuantSpec], bad: float, where: int
) -> None:
    x, spec = case
    x = x.clone()
    x.view(-1)[where % x.numel()] = bad
    try:
        PackedTensor.quantize(x, spec)
    except NonFiniteError as exc:
        assert "65504" in str(exc)
    else:
        raise AssertionError(f"{bad} was quantized")
