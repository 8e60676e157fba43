"""`kvpack::packed_attention`: attention over one layer's packed and exact tokens as one torch operator.

    torch.ops.kvpack.packed_attention(query, exact_keys, exact_values, exact_tokens, sink_len,
                                      key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                                      packed_tokens, key_bits, value_bits, value_group,
                                      key_rotation, value_rotation, key_levels, value_levels, bias, scaling,
                                      integer_products=False)

Its arguments are the cache's own tensors (buffers with spare capacity: the first `exact_tokens` exact and
`packed_tokens` packed tokens are read), so a decode step passes them without slicing; the layer's constants (bits,
value group, rotation matrices, codebook levels: `Constants`) are worked out once per layer. It reads the KIVI
layout without outliers (what the fused kernels read); `bias` is an additive float32 `[batch, queries, tokens]`, or
None for no mask at all. It returns `[batch, queries, heads, value_dim]` in the query's dtype. `integer_products`
allows the CPU kernel's integer arithmetic for 2- and 4-bit uniform codes where the CPU has it (AVX-512 VNNI:
`kvpack.attention.cpu.integer_products`), which adds the error of rounding the query and the attention weights to
two 8-bit digits per block (~1e-4 of the output); the other implementations compute in floating point whatever it
says. Implementations:

    CPU      the C++ kernel (`csrc/packed_attention.cpp`), registered when its default build loads (float32)
    CUDA     the Triton kernel (`kvpack.attention.triton_gpu`)
    Meta     shapes only, for tracing (torch.compile, torch.export)
    else     the float reference (`reference_attention`): any device or dtype, e.g. CPU before the kernel is built
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import reference_attention
from kvpack.config import CODEBOOKS, QuantSpec
from kvpack.quant.codebooks import codebook_levels
from kvpack.quant.rotation import rotation_matrix
from kvpack.quant.tensor import PackedTensor

NAME = "kvpack::packed_attention"
SCHEMA = (
    "packed_attention(Tensor query, Tensor exact_keys, Tensor exact_values, int exact_tokens, int sink_len, "
    "Tensor? key_codes, Tensor? key_scale, Tensor? key_zero, Tensor? value_codes, Tensor? value_scale, "
    "Tensor? value_zero, int packed_tokens, int key_bits, int value_bits, int value_group, Tensor? key_rotation, "
    "Tensor? value_rotation, Tensor? key_levels, Tensor? value_levels, Tensor? bias, float scaling, "
    "bool integer_products=False) -> Tensor"
)


@dataclass(frozen=True)
class Constants:
    """What the operator needs of a layer's specs: the same at every step, so worked out once per layer."""

    key_bits: int
    value_bits: int
    value_group: int
    key_rotation: torch.Tensor | None
    value_rotation: torch.Tensor | None
    key_levels: torch.Tensor | None
    value_levels: torch.Tensor | None

    @classmethod
    def of(cls, keys: PackedTensor, values: PackedTensor) -> Constants:
        def rotation(packed: PackedTensor) -> torch.Tensor | None:
            rotated = packed.spec.rotation != "none"
            return rotation_matrix(packed.shape[-1], packed.codes.device) if rotated else None

        return cls(
            keys.spec.bits, values.spec.bits, values.spec.group_size, rotation(keys), rotation(values),
            keys.levels, values.levels,
        )  # fmt: skip


def arguments(
    query: torch.Tensor,
    inputs: AttentionInputs,
    bias: torch.Tensor | None,
    scaling: float,
    constants: Constants | None = None,
    integer_products: bool = False,
) -> tuple[Any, ...]:
    """The operator's arguments for `inputs` (`constants`: `Constants.of` its packed tensors, when known)."""
    pk, pv = inputs.packed_keys, inputs.packed_values
    exact = (query, inputs.exact_keys, inputs.exact_values, inputs.exact_keys.shape[2], inputs.sink_len)
    if pk is None or pv is None:
        empty = (None, None, None, None, None, None, 0, 8, 8, 16, None, None, None, None)
        return (*exact, *empty, bias, scaling, integer_products)
    c = constants or Constants.of(pk, pv)
    return (
        *exact, pk.codes, pk.scale, pk.zero, pv.codes, pv.scale, pv.zero, pk.shape[2], c.key_bits, c.value_bits,
        c.value_group, c.key_rotation, c.value_rotation, c.key_levels, c.value_levels, bias, scaling,
        integer_products,
    )  # fmt: skip


def _codebook(levels: torch.Tensor | None, bits: int, axis: str) -> str:
    """The codebook whose levels these are ("uniform" for None)."""
    if levels is None:
        return "uniform"
    for name in CODEBOOKS:
        known = codebook_levels(name, bits, axis, levels.device)
        if known is not None and torch.equal(known.to(levels.dtype), levels):
            return name
    raise ValueError(f"{NAME}: levels {levels.tolist()} are no codebook of kvpack's")


def inputs_from(
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    exact_tokens: int,
    sink_len: int,
    packed: tuple[torch.Tensor | None, ...],
    packed_tokens: int,
    key_bits: int,
    value_bits: int,
    value_group: int,
    rotations: tuple[torch.Tensor | None, torch.Tensor | None],
    levels: tuple[torch.Tensor | None, torch.Tensor | None],
) -> AttentionInputs:
    """The `AttentionInputs` that the operator's arguments stand for (the Python implementations read those)."""
    ek, ev = exact_keys[:, :, :exact_tokens], exact_values[:, :, :exact_tokens]
    if not packed_tokens:
        return AttentionInputs(ek, ev, None, None, sink_len)
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = packed
    assert key_codes is not None and key_scale is not None and key_zero is not None
    assert value_codes is not None and value_scale is not None and value_zero is not None
    group = key_codes.shape[4] * 8 // key_bits
    blocks = packed_tokens // group
    key_spec = QuantSpec(
        key_bits, group, "channel", "none" if rotations[0] is None else "hadamard",
        _codebook(levels[0], key_bits, "channel"),  # type: ignore[arg-type]
    )  # fmt: skip
    value_spec = QuantSpec(
        value_bits, value_group, "token", "none" if rotations[1] is None else "hadamard",
        _codebook(levels[1], value_bits, "token"),  # type: ignore[arg-type]
    )  # fmt: skip
    batch, heads = ek.shape[:2]
    keys = PackedTensor(
        key_codes[:, :, :blocks], key_scale[:, :, :blocks], key_zero[:, :, :blocks],
        torch.Size((batch, heads, packed_tokens, ek.shape[3])), key_spec,
    )  # fmt: skip
    values = PackedTensor(
        value_codes[:, :, :packed_tokens], value_scale[:, :, :packed_tokens], value_zero[:, :, :packed_tokens],
        torch.Size((batch, heads, packed_tokens, ev.shape[3])), value_spec,
    )  # fmt: skip
    return AttentionInputs(ek, ev, keys, values, sink_len)


def _split(args: tuple[Any, ...]) -> tuple[torch.Tensor, AttentionInputs, torch.Tensor | None, float]:
    """query, inputs, mask (transformers' form of `bias`) and scaling from the operator's arguments."""
    query, exact_keys, exact_values, exact_tokens, sink_len, *packed = args[:11]
    packed_tokens, key_bits, value_bits, value_group, kr, vr, kl, vl, bias, scaling = args[11:21]
    inputs = inputs_from(
        exact_keys, exact_values, exact_tokens, sink_len, tuple(packed), packed_tokens, key_bits, value_bits,
        value_group, (kr, vr), (kl, vl),
    )  # fmt: skip
    if bias is None and query.shape[2] > 1:  # no mask at all (the reference's None is causal among new tokens)
        bias = query.new_zeros((query.shape[0], query.shape[2], inputs.total_tokens), dtype=torch.float32)
    return query, inputs, None if bias is None else bias[:, None], scaling


def _reference(*args: Any) -> torch.Tensor:
    return reference_attention(*_split(args))


def _triton(*args: Any) -> torch.Tensor:
    from kvpack.attention.triton_gpu import triton_attention

    return triton_attention(*_split(args))


def _fake(query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor, *args: Any) -> torch.Tensor:
    batch, heads, queries, _ = query.shape
    return query.new_empty((batch, queries, heads, exact_values.shape[3]))


_library: torch.library.Library | None = None


def define() -> None:
    """Define the operator and its Python implementations (once per process; the CPU kernel registers its own)."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("kvpack", "FRAGMENT")
    _library.define(SCHEMA)
    _library.impl("packed_attention", _reference, "CompositeExplicitAutograd")
    _library.impl("packed_attention", _triton, "CUDA")
    torch.library.register_fake(NAME, _fake, lib=_library)


define()
