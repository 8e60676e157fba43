"""Attention backends on packed data with codebooks (`QuantSpec.codebook`) and clipped ranges (`QuantSpec.clip`).

Clipping changes only scales and zeros; codebooks change what a code means, and every backend reads their level table
(torch, cpu, numba, triton). Same definition and tolerance as `test_kernels.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvpack.attention import cpu
from kvpack.attention.reference import attention_bias
from kvpack.attention.registry import attend
from kvpack.quant.codebooks import FITTED_CODEBOOK
from tests.attention.inputs import check, make_inputs, naive, needs_x86_compiler, on, padding_mask, use_portable_build

CB = FITTED_CODEBOOK
Params = tuple[tuple[int, int], str, str, bool, str, int, int, int, int, int]
READERS = ["torch"] + ["cpu"] * (cpu.why_unavailable() is None) + ["numba"] * bool(importlib.util.find_spec("numba"))
GRID: list[Params] = [
    # bits (k, v), key codebook, value codebook, clip, rotation, head dim, value group, packed blocks, rep, queries
    ((4, 4), CB, CB, False, "none", 64, 64, 3, 3, 1),  # fused keys and values (AVX-512: permute lookup)
    ((2, 2), CB, CB, True, "none", 64, 32, 4, 2, 2),
    ((3, 3), CB, CB, False, "none", 64, 32, 2, 1, 1),  # 3 bits: unpacked into a tile through the table
    ((4, 2), CB, "uniform", True, "hadamard", 64, 32, 3, 2, 1),
    ((2, 4), "uniform", CB, False, "none", 128, 32, 2, 4, 1),
    ((8, 3), "uniform", CB, True, "none", 64, 16, 2, 1, 3),  # 8-bit keys stay uniform
    ((4, 4), "uniform", "uniform", True, "none", 64, 64, 3, 3, 1),  # clip alone
]


def run(backend: str, params: Params, device: torch.device | None = None) -> None:
    """`backend` against the definition on packed data made as `params` say, read on `device` (triton) if given."""
    bits, key_cb, value_cb, clip, rotation, dim, value_group, blocks, rep, queries = params
    inputs = make_inputs(
        2, 2, blocks, 5, 1, *bits, 32, dim=dim, backend=backend, value_group=value_group, key_rotation=rotation,
        value_rotation=rotation, key_codebook=key_cb, value_codebook=value_cb, clip=clip,
    )  # fmt: skip
    query = torch.randn(2, 2 * rep, queries, dim, generator=torch.Generator().manual_seed(6))
    mask = padding_mask(2, queries, inputs.total_tokens, pad=7)
    expected = naive(query, inputs, attention_bias(mask, 2, queries, inputs.total_tokens), scaling=dim**-0.5)
    if device is not None:
        inputs, query, mask = on(inputs, device, backend), query.to(device), mask.to(device)
    check(attend(query, inputs, mask, scaling=dim**-0.5).cpu(), expected, inputs)


@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("params", GRID)
def test_backends_read_codebooks_and_clipped_ranges(backend: str, params: Params) -> None:
    torch.set_num_threads(1)
    run(backend, params)


# Triton's interpreter takes ~1 ms per program, so only the first entries of the grid: 2-, 3- and 4-bit codebooks
# for keys and values, with and without rotation, on the one-row and the tensor-core paths.
TRITON_GRID = GRID[:4]


@pytest.mark.parametrize("params", TRITON_GRID)
def test_triton_reads_codebooks(triton_device: torch.device, params: Params) -> None:
    torch.set_num_threads(1)
    run("triton", params, triton_device)


@pytest.mark.slow
@needs_x86_compiler
def test_portable_build_reads_codebooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's table lookups without AVX-512 (built for AVX2, ~40 s once): the plain-loop path."""
    use_portable_build(monkeypatch)
    for params in GRID[:4]:
        run("cpu", params)
