"""`PackedTensor`: keys or values of shape `[..., tokens, channels]` in packed group-wise form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvpack.config import QuantSpec
from kvpack.errors import ShapeError
from kvpack.quant.affine import dequantize_groups, from_groups, quantize_groups, to_groups
from kvpack.quant.codebooks import codebook_levels
from kvpack.quant.outliers import restore_outliers, split_outliers
from kvpack.quant.packing import pack, unpack
from kvpack.quant.rotation import rotate, unrotate


@dataclass
class PackedTensor:
    """A quantized `[..., tokens, channels]` tensor.

    spec.axis == "token" (values by default), one row per token:
        codes: uint8 `[..., tokens, channels * bits / 8]`
        scale, zero: float16 `[..., tokens, channels / group_size]`
    spec.axis == "channel" (keys by default), one row per (block of `group_size` tokens, channel):
        codes: uint8 `[..., tokens / group_size, channels, group_size * bits / 8]`
        scale, zero: float16 `[..., tokens / group_size, channels]`
    shape: the logical (dequantized) shape.
    outlier_values, outlier_positions: with `spec.outliers = k > 0`, float16 and uint8 `[*scale.shape, k]`: each
        group's entries kept exactly and their positions in the group (channel for per-token groups, token of the
        block for per-channel groups), increasing; the entries of the stored (rotated, with `spec.rotation`) tensor.
        None when `spec.outliers == 0`.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: torch.Size
    spec: QuantSpec
    outlier_values: torch.Tensor | None = None
    outlier_positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.outlier_values is None or self.outlier_positions is None) != (self.spec.outliers == 0):
            raise ShapeError(
                f"a PackedTensor with spec.outliers={self.spec.outliers} needs outlier_values and outlier_positions "
                "exactly when spec.outliers > 0."
            )

    @classmethod
    def quantize(cls, x: torch.Tensor, spec: QuantSpec) -> PackedTensor:
        """Quantize `x` `[..., tokens, channels]` (any float dtype, any strides) with `spec`.

        With `spec.rotation`, the codes hold `x @ R` (see `kvpack.quant.rotation`); `dequantize` undoes it.
        `spec.codebook` and `spec.clip` choose the levels and the ranges (see `kvpack.quant.affine.quantize_groups`).
        """
        if spec.rotation != "none":
            x = rotate(x, spec.rotation)
        levels = codebook_levels(spec.codebook, spec.bits, spec.axis, x.device)
        groups = to_groups(x, spec.group_size, spec.axis)
        outliers = split_outliers(groups, spec.outliers) if spec.outliers else None
        grouped = quantize_groups(groups if outliers is None else outliers.rest, spec.bits, levels, spec.clip)
        codes = grouped.codes
        if spec.axis == "token":
            codes = from_groups(codes, "token")  # one row of all channels per token
        return cls(
            codes=pack(codes, spec.bits),
            scale=grouped.scale,
            zero=grouped.zero,
            shape=x.shape,
            spec=spec,
            outlier_values=None if outliers is None else outliers.values,
            outlier_positions=None if outliers is None else outliers.positions,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reconstructed `[..., tokens, channels]` tensor in `dtype`."""
        tokens, channels = self.shape[-2], self.shape[-1]
        g = self.spec.group_size
        if self.spec.axis == "token":
            codes = unpack(self.codes, self.spec.bits, channels)
            groups = codes.reshape(*codes.shape[:-1], channels // g, g)
        else:
            groups = unpack(self.codes, self.spec.bits, g)
        levels = self.levels
        if self.spec.rotation == "none" and self.outlier_values is None:
            values = dequantize_groups(groups, self.scale, self.zero, dtype, levels)
            return from_groups(values, self.spec.axis).reshape(*self.shape[:-2], tokens, channels)
        values = dequantize_groups(groups, self.scale, self.zero, torch.float32, levels)
        if self.outlier_values is not None and self.outlier_positions is not None:
            values = restore_outliers(values, self.outlier_values, self.outlier_positions)
        if self.spec.rotation == "none":
            return from_groups(values, self.spec.axis).reshape(*self.shape[:-2], tokens, channels).to(dtype)
        rotated = from_groups(values, self.spec.axis)
        return unrotate(rotated, self.spec.rotation).reshape(*self.shape[:-2], tokens, channels).to(dtype)

    @property
    def levels(self) -> torch.Tensor | None:
        """The codebook's float32 level table `[2**bits]` on the codes' device, or None for uniform codes."""
        return codebook_levels(self.spec.codebook, self.spec.bits, self.spec.axis, self.codes.device)

    def dequantize_rotated(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored (rotated, when `spec.rotation` is set) `[..., tokens, channels]` tensor in `dtype`."""
        return replace(self, spec=replace(self.spec, rotation="none")).dequantize(dtype)

    def slice_tokens(self, start: int, end: int) -> PackedTensor:
        """Tokens `[start, end)` as a `PackedTensor` of views (per-channel groups: multiples of `group_size`)."""
        unit = self.spec.group_size if self.spec.axis == "channel" else 1
        if start % unit or (end % unit and end != self.shape[-2]):
            raise ShapeError(f"per-channel packed tokens slice at multiples of {unit}, got [{start}, {end}).")
        first, last = start // unit, -(-end // unit)
        index = (
            (..., slice(first, last), slice(None), slice(None)) if unit > 1 else (..., slice(first, last), slice(None))
        )
        params = (..., slice(first, last), slice(None))
        outliers = (*params, slice(None))  # one more trailing dimension
        return PackedTensor(
            codes=self.codes[index],
            scale=self.scale[params],
            zero=self.zero[params],
            shape=torch.Size((*self.shape[:-2], end - start, self.shape[-1])),
            spec=self.spec,
            outlier_values=None if self.outlier_values is None else self.outlier_values[outliers],
            outlier_positions=None if self.outlier_positions is None else self.outlier_positions[outliers],
        )

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name: codes, scale, zero, and outlier_values, outlier_positions when held."""
        named = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        if self.outlier_values is not None and self.outlier_positions is not None:
            named |= {"outlier_values": self.outlier_values, "outlier_positions": self.outlier_positions}
        return named

    def map_parts(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedTensor:
        """A `PackedTensor` of the same shape and spec whose stored tensors are `fn` of these (a copy, a move)."""
        mapped: dict[str, Any] = {name: fn(t) for name, t in self.parts().items()}
        return replace(self, **mapped)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: codes, scales and zeros, and the outliers' values and positions."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())
