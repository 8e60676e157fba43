"""Bit-exact tests of `kvpack.quant.packing` against a pure-Python bit-stream reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.errors import ConfigError, KVPackError, ShapeError
from kvpack.quant.packing import pack, packed_row_bytes, unpack

BITS = (2, 3, 4, 8)
# Odd lengths straddle every byte boundary for 3 bits; 8/16/64/128 are the whole-byte cases.
ROW_LENGTHS = (1, 2, 3, 5, 7, 8, 13, 16, 63, 64, 65, 128)
LEADING_SHAPES = ((), (3,), (2, 3))


# ---------------------------------------------------------------------------------------------------------
# Reference: the module docstring's layout, written with Python integers. Code i of a row occupies bits
# [i * bits, (i + 1) * bits) of one little-endian integer; byte k of the row is bits [8k, 8k + 8).


def reference_pack_row(codes: list[int], bits: int) -> bytes:
    stream = 0
    for i, code in enumerate(codes):
        assert 0 <= code < 1 << bits
        stream |= code << (i * bits)
    return stream.to_bytes(math.ceil(len(codes) * bits / 8), "little")


def reference_unpack_row(row: bytes, bits: int, n_codes: int) -> list[int]:
    stream = int.from_bytes(row, "little")
    return [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(n_codes)]


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-by-row reference over any leading shape; returns uint8 [..., ceil(n * bits / 8)]."""
    n = codes.shape[-1]
    rows = codes.reshape(-1, n).tolist()
    packed = [list(reference_pack_row(row, bits)) for row in rows]
    return torch.tensor(packed, dtype=torch.uint8).reshape(*codes.shape[:-1], math.ceil(n * bits / 8))


def random_codes(shape: tuple[int, ...], bits: int, seed: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The reference itself, checked by hand so that it cannot share a mistake with the code under test.


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (2, [1, 2, 3, 0], bytes([0b00_11_10_01])),
        (2, [3, 1, 2], bytes([0b00_10_01_11])),  # 6 bits used, top 2 zero
        (4, [0xA, 0x5], bytes([0x5A])),
        (4, [0xF, 0x1, 0x7], bytes([0x1F, 0x07])),
        (8, [0x12, 0xFE], bytes([0x12, 0xFE])),
        # 0..7 at 3 bits = 0xFAC688 as a 24-bit little-endian integer.
        (3, [0, 1, 2, 3, 4, 5, 6, 7], bytes([0x88, 0xC6, 0xFA])),
        # code 2 = 0b101 occupies bits 6..8: its low two bits end byte 0, its top bit starts byte 1.
        (3, [0b001, 0b111, 0b101], bytes([0b01_111_001, 0b1])),
    ],
)
def test_known_vectors(bits: int, codes: list[int], expected: bytes) -> None:
    assert reference_pack_row(codes, bits) == expected
    assert reference_unpack_row(expected, bits, len(codes)) == codes
    packed = pack(torch.tensor(codes), bits)
    assert bytes(packed.tolist()) == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes


# ---------------------------------------------------------------------------------------------------------
# pack / unpack against the reference.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("leading", LEADING_SHAPES)
def test_pack_matches_reference(bits: int, n: int, leading: tuple[int, ...]) -> None:
    codes = random_codes((*leading, n), bits, seed=1000 * bits + n)
    packed = pack(codes, bits)
    expected = reference_pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*leading, packed_row_bytes(n, bits))
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("leading", LEADING_SHAPES)
def test_unpack_matches_reference(bits: int, n: int, leading: tuple[int, ...]) -> None:
    codes = random_codes((*leading, n), bits, seed=7 + 1000 * bits + n)
    packed = reference_pack(codes, bits)
    unpacked = unpack(packed, bits, n)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, codes.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_pack_accepts_any_integer_dtype(bits: int, dtype: torch.dtype) -> None:
    codes = random_codes((4, 13), bits, seed=bits, dtype=dtype)
    assert torch.equal(pack(codes, bits), reference_pack(codes, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 3, 5, 7, 13, 63])
def test_unused_high_bits_of_last_byte_are_zero(bits: int, n: int) -> None:
    # All-ones codes set every used bit, so the last byte shows exactly which bits are used.
    codes = torch.full((2, n), (1 << bits) - 1)
    packed = pack(codes, bits)
    used_in_last = (n * bits) % 8 or 8
    assert torch.all(packed[:, :-1] == 0xFF)
    assert torch.all(packed[:, -1] == (1 << used_in_last) - 1)


@pytest.mark.parametrize("bits", BITS)
def test_codes_do_not_bleed_into_neighbours(bits: int) -> None:
    # One all-ones code among zeros at every position: exactly its own bits are set in the stream.
    n = 13
    for i in range(n):
        codes = torch.zeros(n, dtype=torch.uint8)
        codes[i] = (1 << bits) - 1
        stream = int.from_bytes(bytes(pack(codes, bits).tolist()), "little")
        assert stream == ((1 << bits) - 1) << (i * bits)


# ---------------------------------------------------------------------------------------------------------
# Non-contiguous inputs.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [5, 13, 64])
def test_pack_non_contiguous_inputs(bits: int, n: int) -> None:
    base = random_codes((n, 6), bits, seed=n + bits)
    transposed = base.t()  # [6, n], strides (1, 6)
    strided = random_codes((6, 2 * n), bits, seed=n)[:, ::2]  # [6, n], stride 2 along the row
    expanded = random_codes((1, n), bits, seed=3).expand(4, n)  # stride 0 along the batch
    batched_view = random_codes((3, n, 5), bits, seed=4).permute(2, 0, 1)  # [5, 3, n]
    for codes in (transposed, strided, expanded, batched_view):
        assert not codes.is_contiguous()
        assert torch.equal(pack(codes, bits), reference_pack(codes.contiguous(), bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [5, 13, 64])
def test_unpack_non_contiguous_inputs(bits: int, n: int) -> None:
    codes = random_codes((6, n), bits, seed=n * bits)
    packed = reference_pack(codes, bits)
    transposed = packed.t().contiguous().t()  # same values, column-major strides
    row_bytes = packed.shape[-1]
    strided = torch.zeros(6, 2 * row_bytes, dtype=torch.uint8)
    strided[:, ::2] = packed
    strided = strided[:, ::2]
    for view in (transposed, strided):
        if row_bytes > 1:
            assert not view.is_contiguous()
        assert torch.equal(unpack(view, bits, n), codes.to(torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# Round trip, as a property.


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from(BITS))
    leading = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    n = draw(st.integers(1, 40))
    numel = math.prod(leading) * n
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.int64).reshape(*leading, n), bits


@settings(max_examples=50, deadline=None, database=None)
@given(codes_and_bits())
def test_round_trip_property(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    n = codes.shape[-1]
    packed = pack(codes, bits)
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_exhaustive_small(bits: int) -> None:
    # Every code value at every position of a row that spans several bytes.
    values = torch.arange(1 << bits)
    codes = torch.stack([values.roll(shift) for shift in range(1 << bits)])  # [2**bits, 2**bits]
    codes = torch.cat([codes, codes[:, :3]], dim=-1)  # odd length
    assert torch.equal(unpack(pack(codes, bits), bits, codes.shape[-1]), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_empty_leading_dimension(bits: int) -> None:
    codes = torch.zeros(0, 5, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (0, packed_row_bytes(5, bits))
    assert unpack(packed, bits, 5).shape == (0, 5)


# ---------------------------------------------------------------------------------------------------------
# packed_row_bytes.


@pytest.mark.parametrize(
    ("n", "bits", "expected"),
    [
        (0, 2, 0),
        (1, 2, 1),
        (4, 2, 1),
        (5, 2, 2),
        (1, 3, 1),
        (3, 3, 2),  # 9 bits
        (8, 3, 3),  # 24 bits, no padding
        (13, 3, 5),  # 39 bits
        (64, 3, 24),
        (1, 4, 1),
        (3, 4, 2),
        (128, 4, 64),
        (63, 8, 63),
    ],
)
def test_packed_row_bytes_table(n: int, bits: int, expected: int) -> None:
    assert packed_row_bytes(n, bits) == expected


@pytest.mark.parametrize("bits", BITS)
def test_packed_row_bytes_is_ceil_of_bits(bits: int) -> None:
    for n in range(200):
        assert packed_row_bytes(n, bits) == math.ceil(n * bits / 8)


# ---------------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("bits", [-1, 0, 1, 5, 6, 7, 16])
def test_unsupported_bits_raise_config_error(bits: int) -> None:
    with pytest.raises(ConfigError, match="supported widths"):
        pack(torch.zeros(3, 8, dtype=torch.uint8), bits)
    with pytest.raises(ConfigError, match="supported widths"):
        unpack(torch.zeros(3, 8, dtype=torch.uint8), bits, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 5, 13, 64])
def test_unpack_wrong_row_length_raises_shape_error(bits: int, n: int) -> None:
    row_bytes = packed_row_bytes(n, bits)
    for wrong in (row_bytes - 1, row_bytes + 1):
        with pytest.raises(ShapeError, match=f"takes {row_bytes} bytes") as info:
            unpack(torch.zeros(2, wrong, dtype=torch.uint8), bits, n)
        assert isinstance(info.value, KVPackError)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float16, torch.float32])
def test_unpack_wrong_dtype_raises_shape_error(dtype: torch.dtype) -> None:
    with pytest.raises(ShapeError, match="must be uint8"):
        unpack(torch.zeros(2, 4, dtype=dtype), 4, 8)
