"""Dense-and-sparse groups: the few entries of a group that widen its range most are kept exactly, apart.

With `QuantSpec.outliers = k`, each group of `g` entries keeps `k` of them as float16 values with their uint8
positions in the group; the affine scale and zero are computed from the other `g - k` entries, so one extreme entry no
longer sets the step of the whole group. Reconstruction is the affine values with the kept positions overwritten.

Which entries: the `k` that, removed, leave the narrowest range. Removing entries from a sorted group can only narrow
its range by taking some `i` from the bottom and `k - i` from the top, so the best set is found exactly by trying the
`k + 1` splits. Chosen over "the `k` farthest from the median" and "... from the mean" by the mean squared error of
the default model's keys and values on the calibration text (`benchmarks/scripts/outlier_centres.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.errors import NonFiniteError
from kvpack.quant.affine import FP16_MAX


@dataclass
class OutlierSplit:
    """One group tensor `[..., g]` split into kept entries and the rest.

    values: float16 `[..., k]`, the kept entries, in increasing position order.
    positions: uint8 `[..., k]`, their positions in the group (distinct, increasing).
    rest: float32 `[..., g]`, the group with each kept entry replaced by one of the others (the smallest remaining),
        so that its minimum and maximum are those of the remaining entries.
    """

    values: torch.Tensor
    positions: torch.Tensor
    rest: torch.Tensor


def outlier_positions(groups: torch.Tensor, count: int) -> torch.Tensor:
    """int64 `[..., count]`: positions (increasing) of the `count` entries of each group (last dimension of the
    float32 `groups`) whose removal leaves the narrowest range; ties go to the split that takes fewer from the bottom.
    """
    g = groups.shape[-1]
    ordered, order = torch.sort(groups, dim=-1, stable=True)
    bottom = torch.arange(count + 1, device=groups.device)  # i entries from the bottom, count - i from the top
    ranges = ordered[..., g - 1 - count + bottom] - ordered[..., bottom]
    take_bottom = ranges.argmin(dim=-1, keepdim=True)  # [..., 1]
    j = torch.arange(count, device=groups.device)
    sorted_index = torch.where(j < take_bottom, j, g - count + j)  # the j-th removed entry, in sorted order
    return order.gather(-1, sorted_index).sort(dim=-1).values


def split_outliers(groups: torch.Tensor, count: int) -> OutlierSplit:
    """Keep `count` entries of each group along the last dimension of `groups` (see `outlier_positions`).

    Raises NonFiniteError for NaN/Inf or values beyond ±65504 (float16's range), as `quantize_groups` does.
    """
    x = groups.float()
    if x.numel() and (not bool(torch.isfinite(x).all()) or float(x.abs().amax()) > FP16_MAX):
        raise NonFiniteError(
            f"cannot quantize keys/values containing NaN/Inf or values beyond ±{FP16_MAX:g}, outliers included: "
            "kvpack refuses them rather than store a wrong number. Check the model's numerics (e.g. run it in "
            "float32 or bfloat16), or keep such layers in full precision."
        )
    positions = outlier_positions(x, count)
    kept = x.gather(-1, positions)
    remaining = torch.ones_like(x, dtype=torch.bool).scatter_(-1, positions, False)
    lowest_remaining = torch.where(remaining, x, torch.inf).amin(dim=-1, keepdim=True)
    rest = x.scatter(-1, positions, lowest_remaining.expand_as(kept))
    return OutlierSplit(values=kept.to(torch.float16), positions=positions.to(torch.uint8), rest=rest)


def restore_outliers(values: torch.Tensor, kept: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`values` (float32 groups `[..., g]`) with the kept float16 entries `[..., k]` written at their positions."""
    return values.scatter(-1, positions.long(), kept.float())
