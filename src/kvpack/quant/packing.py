"""Bit-exact packing of low-bit integer codes into uint8 storage.

Layout (the same for every width): the codes of a row form one little-endian bit stream: code `i`
occupies bits `[i * bits, (i + 1) * bits)`, and byte `k` of the row holds bits `[8k, 8k + 8)` with the
lowest bit first. A row of `n` codes takes `ceil(n * bits / 8)` bytes; only the last byte may hold
unused (zero) bits. For 2, 4 and 8 bits this is the familiar "code j of a byte at shift j * bits";
3-bit codes straddle byte boundaries (8 codes in 3 bytes).
"""

from __future__ import annotations

import torch

from kvpack.config import SUPPORTED_BITS
from kvpack.errors import ConfigError, ShapeError


def packed_row_bytes(n_codes: int, bits: int) -> int:
    """Bytes that one row of `n_codes` codes of width `bits` occupies."""
    return (n_codes * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"cannot pack {bits}-bit codes; supported widths are {SUPPORTED_BITS}.")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in `[0, 2**bits)` along the last dimension.

    codes: any integer tensor `[..., n]` (non-contiguous is fine). Returns uint8 `[..., ceil(n*bits/8)]`.
    Codes must fit in `bits` (the caller's contract; `quantize_groups` guarantees it): wider codes would
    spill into their neighbours' bits.
    """
    _check_bits(bits)
    n = codes.shape[-1]
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-n) % per_byte
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        grouped = codes.reshape(*codes.shape[:-1], (n + pad) // per_byte, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        # Fields do not overlap, so a sum of shifted codes is their bitwise or.
        return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)
    # General path (3 bits): expand to a bit stream, regroup by bytes.
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> bit_idx) & 1).reshape(*codes.shape[:-1], n * bits)
    pad = (-(n * bits)) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*codes.shape[:-1], (n * bits + pad) // 8, 8)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream << byte_shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 `[..., ceil(n*bits/8)]` -> uint8 codes `[..., n_codes]`."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ShapeError(f"packed codes must be uint8, got {packed.dtype}.")
    if packed.shape[-1] != packed_row_bytes(n_codes, bits):
        raise ShapeError(
            f"a row of {n_codes} {bits}-bit codes takes {packed_row_bytes(n_codes, bits)} bytes, "
            f"but the packed rows have {packed.shape[-1]}."
        )
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))[..., :n_codes]
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    stream = stream[..., : n_codes * bits].reshape(*packed.shape[:-1], n_codes, bits)
    bit_shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream << bit_shifts).sum(dim=-1, dtype=torch.uint8)
