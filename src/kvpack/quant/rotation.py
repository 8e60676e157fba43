"""Orthogonal rotations of the channel dimension, applied before quantization and undone after.

Keys and values of a head are `x @ R` when stored, `y @ R.T` when read back: R is orthogonal, so attention is
unchanged in exact arithmetic (q·k = (q R)·(k R); sum_t w_t v_t = (sum_t w_t v_t R) R.T), while the rotated
channels spread outliers over all channels, so each group's range (and the quantization step) shrinks.

`hadamard`: a randomized Hadamard transform, H_d diag(signs) / sqrt(d) with H_d Sylvester's Hadamard matrix, for
head dims that are powers of two; other head dims get a random orthogonal matrix (QR of a Gaussian). Either is
fixed by the head dim alone (a constant seed), so a stored cache can be read back by any process.
"""

from __future__ import annotations

from functools import cache

import torch

from kvpack.config import ROTATIONS, Rotation

__all__ = ["ROTATIONS", "Rotation", "rotate", "rotation_matrix", "unrotate"]
_SEED = 0x6B7670  # fixed: the rotation is part of the stored format


@cache
def _rotation_cpu(dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_SEED + dim)
    if dim & (dim - 1) == 0:
        hadamard = torch.ones(1, 1, dtype=torch.float64)
        while hadamard.shape[0] < dim:
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
        signs = torch.randint(0, 2, (dim,), generator=generator).to(torch.float64) * 2 - 1
        matrix = signs[:, None] * hadamard / dim**0.5
    else:
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        matrix = q * torch.sign(torch.diagonal(r))[None, :]
    return matrix.to(torch.float32).contiguous()


_on_device: dict[tuple[int, torch.device], torch.Tensor] = {}


def rotation_matrix(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 orthogonal `[dim, dim]` matrix R of the `hadamard` rotation (stored = x @ R)."""
    device = torch.device(device)
    key = (dim, device)
    if key not in _on_device:
        _on_device[key] = _rotation_cpu(dim).to(device)
    return _on_device[key]


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """`x @ R` in float32 over the last dimension (x unchanged, as float32, when rotation is `none`)."""
    if rotation == "none":
        return x.float()
    return x.float() @ rotation_matrix(x.shape[-1], x.device)


def unrotate(y: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """`y @ R.T` in float32: the inverse of `rotate`."""
    if rotation == "none":
        return y.float()
    return y.float() @ rotation_matrix(y.shape[-1], y.device).T
