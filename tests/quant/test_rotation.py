"""Rotations before quantization: orthogonal, invisible to attention in exact arithmetic, undone on read-back."""

from __future__ import annotations

import pytest
import torch

from kvpack.config import QuantSpec
from kvpack.quant.rotation import rotate, rotation_matrix, unrotate
from kvpack.quant.tensor import PackedTensor

# Head dims: powers of two get a randomized Hadamard matrix, the others a random orthogonal one.
DIMS = [16, 64, 96, 128, 256]


@pytest.mark.parametrize("dim", DIMS)
def test_rotation_is_orthogonal_and_fixed(dim: int) -> None:
    r = rotation_matrix(dim).double()
    torch.testing.assert_close(r @ r.T, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(rotation_matrix(dim), rotation_matrix(dim))  # a stored cache must read back the same
    if dim & (dim - 1) == 0:  # Hadamard: every entry is ±1/sqrt(dim), so an outlier spreads over all channels
        torch.testing.assert_close(r.abs(), torch.full_like(r, dim**-0.5))


@pytest.mark.parametrize("dim", DIMS)
def test_attention_is_invariant_to_the_rotation(dim: int) -> None:
    """softmax(q k^T) v == softmax((q R)(k R)^T) (v R) R^T, to 1e-5 in float32."""
    gen = torch.Generator().manual_seed(dim)
    q, k, v = (torch.randn(2, 3, n, dim, generator=gen) for n in (4, 50, 50))
    k[..., 5] *= 20  # an outlier channel, as real keys have
    plain = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, dim=-1) @ v
    rq, rk, rv = rotate(q, "hadamard"), rotate(k, "hadamard"), rotate(v, "hadamard")
    rotated = unrotate(torch.softmax(rq @ rk.transpose(-1, -2) / dim**0.5, dim=-1) @ rv, "hadamard")
    assert (rotated - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_round_trip_error_is_the_rotated_data_s(axis: str, bits: int) -> None:
    """Dequantize undoes the rotation; the error's norm per token is that of the rotated data (R is orthogonal),
    which is at most half a step per element."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 2, 64, 64, generator=gen)
    x[..., 7] *= 30
    spec = QuantSpec(bits, 32, axis, "hadamard")  # type: ignore[arg-type]
    packed = PackedTensor.quantize(x, spec)
    stored = packed.dequantize_rotated()
    error = packed.dequantize() - x
    rotated_error = stored - rotate(x, "hadamard")
    torch.testing.assert_close(error.norm(dim=-1), rotated_error.norm(dim=-1), atol=1e-4, rtol=1e-4)
    half_step = packed.scale.float().max().item() / 2
    assert rotated_error.abs().max().item() <= half_step * (1 + 1e-5)


def test_rotation_spreads_a_value_outlier() -> None:
    """Why rotate: per-token value groups with one outlier channel lose far less with the rotation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 64, generator=gen)
    x[..., 3] *= 20
    errors = {}
    for rotation in ("none", "hadamard"):
        packed = PackedTensor.quantize(x, QuantSpec(2, 64, "token", rotation))  # type: ignore[arg-type]
        errors[rotation] = (packed.dequantize() - x).norm().item()
    assert errors["hadamard"] < 0.6 * errors["none"]
