"""Test data for quantization, and `PackedTensor`'s documented layout computed by index arithmetic (the reference the
tests hold the packed format to)."""

from __future__ import annotations

import torch

from kvpack.config import QuantSpec
from kvpack.quant.packing import unpack
from kvpack.quant.tensor import PackedTensor
from tests.quant.tolerances import max_abs_error


def gaussian(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal samples of `shape`, seeded, in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def heavy_tailed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Student-t (3 degrees of freedom) samples: outliers, as real keys and values have."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    return normal / (chi2 / 3).sqrt()


def per_element(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Broadcast a per-group tensor (scale or zero) to `[..., tokens, channels]`, as the layout documents."""
    dim = -1 if spec.axis == "token" else -2  # token: [..., T, C/g]; channel: [..., T/g, C]
    return t.repeat_interleave(spec.group_size, dim=dim)


def reference_dequantize(pt: PackedTensor) -> torch.Tensor:
    """Element (t, c) from the documented fields, by index arithmetic; float32 `[..., tokens, channels]`."""
    tokens, channels = pt.shape[-2], pt.shape[-1]
    g, bits = pt.spec.group_size, pt.spec.bits
    if pt.spec.axis == "token":
        codes = unpack(pt.codes, bits, channels)  # [..., T, C]
    else:
        blocks = unpack(pt.codes, bits, g)  # [..., T/g, C, g]
        t = torch.arange(tokens)
        codes = blocks[..., t // g, :, t % g].movedim(0, -2)  # advanced indices go first: [T, ..., C]
    return codes.float() * per_element(pt.scale, pt.spec).float() + per_element(pt.zero, pt.spec).float()


def assert_within_half_step(x: torch.Tensor, pt: PackedTensor) -> None:
    """Every element of `x` is within half a step of its reconstruction (`tolerances.max_abs_error`)."""
    x_hat = pt.dequantize(torch.float32)
    bound = max_abs_error(per_element(pt.scale, pt.spec), x_hat, pt.spec.bits)
    error = (x.double() - x_hat.double()).abs()
    assert torch.all(error <= bound), f"worst error / bound: {float((error / bound).max())}"
