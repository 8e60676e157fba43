"""Group-wise asymmetric affine quantization: the pure-torch reference every kernel is tested against.

A group of values `x` is stored as integer codes `c` in `[0, 2**bits - 1]` with one float16 `scale`
and one float16 `zero` (the group's minimum, rounded down):

    x ~= level[c] * scale + zero

where `level` is the codebook (`kvpack.quant.codebooks`): `level[c] = c` for the default uniform codes, or a
fitted table of 2**bits sorted levels inside `[0, 2**bits - 1]`; each element gets its nearest level.

Scales and zeros are float16 whatever the model dtype: 2 bytes each (the convention of KIVI and of
transformers' quantized cache), enough range for keys and values (|x| <= 65504), and 11 bits of
precision, which bfloat16 (8 bits) would not give. The codes are computed from the *rounded* float16
scale and zero, with the zero rounded down and the scale rounded up, so that without clipping every element
of a uniform group is within half a step (`scale / 2`) of its reconstruction (within half the widest gap
between neighbouring levels, or the distance from the range's ends to the outer levels, with a codebook): no
clamping ever happens.

With `clip=True` the range is chosen by a grid search over ranges shrunk from [min, max] (`CLIP_CUTS`), keeping
the one with the smallest squared reconstruction error of the group; elements outside a shrunk range are clamped
to its end, so they may lie farther than half a step from their reconstruction. The unshrunk range is one of the
candidates and wins ties, so clipping never increases a group's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.config import Axis
from kvpack.errors import NonFiniteError, ShapeError

FP16_MAX = 65504.0


@dataclass
class AffineGroups:
    """Unpacked codes of groups laid out along the last dimension.

    codes: uint8 `[..., n_groups_dims..., group_size]`, values in `[0, 2**bits)`.
    scale, zero: float16 `[..., n_groups_dims...]` (the codes' shape without the last dimension).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _round_fp16(x: torch.Tensor, toward: float) -> torch.Tensor:
    """Round float32 `x` to float16, moving one ulp toward `toward` (±inf) where rounding went the other way."""
    rounded = x.to(torch.float16)
    wrong_way = rounded.float() > x if toward < 0 else rounded.float() < x
    stepped = torch.nextafter(rounded, torch.full_like(rounded, toward))
    return torch.where(wrong_way, stepped, rounded)


# Clipping candidates: (fraction of the range cut at the bottom, fraction cut at the top). The first is no cut.
CLIP_CUTS: tuple[tuple[float, float], ...] = tuple((0.025 * i, 0.025 * i) for i in range(11))


def _scale_zero(low: torch.Tensor, high: torch.Tensor, qmax: int, uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 zero (rounded down) and scale (rounded up) covering [low, high] in qmax steps.

    A constant group's scale is 1 with uniform codes (code 0 is then `zero` exactly), 0 with a codebook (whose lowest
    level need not be 0: every code is then `zero`).
    """
    zero = _round_fp16(low, toward=float("-inf"))
    scale = _round_fp16((high - zero.float()) / qmax, toward=float("inf"))
    if uniform:
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zero


def _encode(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, levels: torch.Tensor | None
) -> torch.Tensor:
    """Codes of float32 groups `x`: the nearest level (uniform: round to nearest), clamped to the range's ends."""
    divisor = scale.float() if levels is None else torch.where(scale == 0, 1.0, scale.float())
    steps = (x - zero.float().unsqueeze(-1)) / divisor.unsqueeze(-1)
    if levels is None:
        return torch.round(steps).clamp_(0, qmax).to(torch.uint8)
    midpoints = (levels[1:] + levels[:-1]) * 0.5
    return torch.bucketize(steps.contiguous(), midpoints).to(torch.uint8)


def _decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """`level[c] * scale + zero` in float32 (no clamping)."""
    steps = codes.float() if levels is None else levels[codes.long()]
    return steps * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)


def quantize_groups(
    groups: torch.Tensor, bits: int, levels: torch.Tensor | None = None, clip: bool = False
) -> AffineGroups:
    """Quantize each group along the last dimension of `groups` to `bits`-bit codes.

    levels: the codebook, float32 `[2**bits]` sorted inside `[0, 2**bits - 1]` (see `kvpack.quant.codebooks`), or
        None for uniform codes (level[c] = c).
    clip: choose each group's range among `CLIP_CUTS` (shrunk from [min, max]) by its squared reconstruction error;
        vectorized over groups, one pass per candidate.

    Raises NonFiniteError when a value is NaN/Inf or outside the float16 range (|x| > 65504): such values
    have no faithful float16 scale/zero, and kvpack never silently stores a wrong number.
    """
    x = groups.float()
    low = x.amin(dim=-1)
    high = x.amax(dim=-1)
    extreme = torch.maximum(low.abs(), high.abs()).max() if low.numel() else torch.tensor(0.0)
    if not bool(torch.isfinite(extreme)) or float(extreme) > FP16_MAX:
        raise NonFiniteError(
            f"cannot quantize keys/values containing NaN/Inf or values beyond ±{FP16_MAX:g} "
            f"(largest magnitude seen: {float(extreme)}). kvpack's policy is to refuse them rather than store a "
            "wrong number: check the model's numerics (e.g. run it in float32 or bfloat16), or keep such layers in "
            "full precision."
        )
    qmax = (1 << bits) - 1
    if levels is not None:
        levels = levels.to(device=x.device, dtype=torch.float32)
    scale, zero = _scale_zero(low, high, qmax, levels is None)
    codes = _encode(x, scale, zero, qmax, levels)
    if clip and x.numel():
        best = ((_decode(codes, scale, zero, levels) - x) ** 2).sum(dim=-1)
        span = high - low
        for cut_low, cut_high in CLIP_CUTS[1:]:
            cand_scale, cand_zero = _scale_zero(low + span * cut_low, high - span * cut_high, qmax, levels is None)
            cand_codes = _encode(x, cand_scale, cand_zero, qmax, levels)
            error = ((_decode(cand_codes, cand_scale, cand_zero, levels) - x) ** 2).sum(dim=-1)
            better = error < best  # strict: ties keep the wider range
            best = torch.where(better, error, best)
            scale = torch.where(better, cand_scale, scale)
            zero = torch.where(better, cand_zero, zero)
            codes = torch.where(better.unsqueeze(-1), cand_codes, codes)
    return AffineGroups(codes=codes, scale=scale, zero=zero)


def dequantize_groups(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    dtype: torch.dtype,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`level[codes] * scale + zero` in float32 (`codes * scale + zero` when `levels` is None), cast to `dtype`;
    scale/zero broadcast over the last dimension.

    Results are clamped to ±65504: inputs never exceed it (`quantize_groups` refuses them), but a
    reconstruction may overshoot by up to half a step, which float16 would turn into inf.
    """
    if levels is not None:
        levels = levels.to(device=codes.device, dtype=torch.float32)
    return _decode(codes, scale, zero, levels).clamp_(-FP16_MAX, FP16_MAX).to(dtype)


def to_groups(x: torch.Tensor, group_size: int, axis: Axis) -> torch.Tensor:
    """View `[..., tokens, channels]` as groups along the last dimension.

    axis="token": `[..., tokens, channels / g, g]` (groups of channels of one token).
    axis="channel": `[..., tokens / g, channels, g]` (groups of tokens of one channel).
    """
    if x.dim() < 2:
        raise ShapeError(f"expected a tensor [..., tokens, channels], got shape {tuple(x.shape)}.")
    tokens, channels = x.shape[-2], x.shape[-1]
    if axis == "token":
        if channels % group_size:
            raise ShapeError(
                f"per-token groups of {group_size} need a head_dim divisible by {group_size}, got {channels}; "
                "pick a group size that divides head_dim."
            )
        return x.reshape(*x.shape[:-1], channels // group_size, group_size)
    if tokens % group_size:
        raise ShapeError(
            f"per-channel groups of {group_size} tokens need a multiple of {group_size} tokens, got {tokens}."
        )
    return x.reshape(*x.shape[:-2], tokens // group_size, group_size, channels).transpose(-1, -2)


def from_groups(groups: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Inverse of `to_groups`: back to `[..., tokens, channels]`."""
    if axis == "token":
        return groups.reshape(*groups.shape[:-2], groups.shape[-2] * groups.shape[-1])
    blocks, channels, group_size = groups.shape[-3:]
    return groups.transpose(-1, -2).reshape(*groups.shape[:-3], blocks * group_size, channels)
