"""Every attention backend against the definition: softmax(q·K·scaling + bias)·V over the dequantized cache.

The inputs are real packed data (`PackedTensor.quantize`), so the comparison isolates the kernels' arithmetic:
the naive dense computation here, the chunked torch reference, and the fused CPU kernel must agree within
`ATTENTION_REL_TOL` over bits x group sizes x odd lengths x batch x grouped-query ratios x sinks x masks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from kvpack.attention import cpu
from kvpack.attention.reference import attention_bias, reference_attention
from kvpack.attention.registry import attend
from kvpack.errors import BackendUnavailableError
from kvpack.quant.tensor import PackedTensor
from tests.attention.inputs import check, make_inputs, naive, needs_x86_compiler, padding_mask, use_portable_build

BACKENDS = ["torch"] + ["cpu"] * (cpu.why_unavailable() is None) + ["numba"] * bool(importlib.util.find_spec("numba"))
GRID = [
    # bits (k, v), group, packed blocks, exact tokens, sinks, batch, kv heads, query heads per kv head, queries
    ((4, 4), 64, 3, 5, 0, 1, 3, 3, 1),
    ((2, 2), 32, 5, 1, 0, 2, 2, 1, 1),
    ((3, 3), 32, 2, 7, 4, 1, 2, 4, 1),
    ((8, 8), 64, 2, 3, 0, 2, 1, 2, 1),
    ((4, 2), 32, 4, 9, 2, 1, 2, 2, 3),
    ((2, 4), 64, 1, 130, 0, 1, 1, 3, 1),
    ((3, 8), 64, 3, 2, 1, 2, 2, 1, 2),
    ((8, 3), 32, 1, 1, 0, 1, 3, 1, 1),
    ((4, 4), 32, 0, 6, 0, 2, 2, 2, 1),  # nothing packed yet
    ((4, 4), 32, 40, 3, 0, 1, 2, 3, 1),  # several chunks per head
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize(("bits", "group", "blocks", "exact", "sinks", "batch", "kv_heads", "rep", "queries"), GRID)
def test_backend_matches_the_definition(
    backend: str, masked: bool, bits: tuple[int, int], group: int, blocks: int, exact: int, sinks: int,
    batch: int, kv_heads: int, rep: int, queries: int,
) -> None:  # fmt: skip
    torch.set_num_threads(1)
    exact = max(exact, queries)
    inputs = make_inputs(batch, kv_heads, blocks, exact, sinks, *bits, group, backend=backend)
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(batch, kv_heads * rep, queries, 64, generator=gen)
    tokens = inputs.total_tokens
    mask = padding_mask(batch, queries, tokens, pad=min(tokens - 1, sinks + group + 3)) if masked else None
    expected = naive(query, inputs, attention_bias(mask, batch, queries, tokens), scaling=0.125)
    check(attend(query, inputs, mask, scaling=0.125), expected, inputs)


WIDE_GRID = [
    # bits (k, v), key group, value group, head dim, packed blocks, exact tokens, kv heads, query heads per kv head,
    # queries: several value groups per row, rows in passes of 4, 128- and 256-dim heads (Llama-7B, Gemma 3)
    ((4, 4), 64, 32, 128, 3, 5, 2, 4, 1),
    ((2, 8), 32, 64, 128, 2, 3, 1, 8, 1),
    ((8, 2), 64, 16, 256, 2, 4, 1, 5, 2),
    ((4, 2), 16, 16, 32, 4, 3, 2, 3, 1),
    ((3, 4), 32, 128, 128, 2, 2, 1, 2, 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("bits", "group", "value_group", "dim", "blocks", "exact", "kv_heads", "rep", "queries"), WIDE_GRID
)
def test_wide_heads_and_many_rows(
    backend: str, bits: tuple[int, int], group: int, value_group: int, dim: int, blocks: int, exact: int,
    kv_heads: int, rep: int, queries: int,
) -> None:  # fmt: skip
    torch.set_num_threads(1)
    exact = max(exact, queries)
    inputs = make_inputs(1, kv_heads, blocks, exact, 1, *bits, group, dim=dim, backend=backend, value_group=value_group)
    query = torch.randn(1, kv_heads * rep, queries, dim, generator=torch.Generator().manual_seed(2))
    tokens = inputs.total_tokens
    mask = padding_mask(1, queries, tokens, pad=3)
    expected = naive(query, inputs, attention_bias(mask, 1, queries, tokens), scaling=dim**-0.5)
    check(attend(query, inputs, mask, scaling=dim**-0.5), expected, inputs)


ROTATED = [("hadamard", "hadamard"), ("hadamard", "none"), ("none", "hadamard")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("key_rotation", "value_rotation"), ROTATED)
@pytest.mark.parametrize(
    ("bits", "dim", "value_group", "rep", "queries"), [((4, 4), 64, 32, 3, 1), ((2, 3), 96, 32, 2, 2)]
)
def test_rotated_packed_data(
    backend: str, key_rotation: str, value_rotation: str, bits: tuple[int, int], dim: int, value_group: int,
    rep: int, queries: int,
) -> None:  # fmt: skip
    """Packed data stored rotated (Hadamard for 64, a random orthogonal matrix for 96): the same definition."""
    torch.set_num_threads(1)
    inputs = make_inputs(
        2, 2, 3, 5, 1, *bits, 32, dim=dim, backend=backend, value_group=value_group, key_rotation=key_rotation,
        value_rotation=value_rotation,
    )  # fmt: skip
    query = torch.randn(2, 2 * rep, queries, dim, generator=torch.Generator().manual_seed(4))
    mask = padding_mask(2, queries, inputs.total_tokens, pad=7)
    expected = naive(query, inputs, attention_bias(mask, 2, queries, inputs.total_tokens), scaling=dim**-0.5)
    check(attend(query, inputs, mask, scaling=dim**-0.5), expected, inputs)


@pytest.mark.skipif(not importlib.util.find_spec("numba"), reason="numba not installed")
def test_numba_reads_rotated_data_refuses_outliers_and_auto_passes_them_by() -> None:
    """Rotated packed data is read; the same keys packed with outlier entries are refused for them, and `auto`
    moves on to a backend that reads them."""
    rotated = make_inputs(1, 1, 2, 3, 0, 4, 4, 32, backend="numba", key_rotation="hadamard", value_rotation="hadamard")
    assert rotated.packed_keys is not None
    query = torch.randn(1, 1, 1, 64, generator=torch.Generator().manual_seed(5))
    check(attend(query, rotated, None, 0.125), naive(query, rotated, None, 0.125), rotated)
    spec = replace(rotated.packed_keys.spec, outliers=1)
    with_outliers = replace(rotated, packed_keys=PackedTensor.quantize(rotated.packed_keys.dequantize(), spec))
    with pytest.raises(BackendUnavailableError, match="numba kernel does not read outlier entries"):
        attend(query, with_outliers, None, 0.125)
    with_outliers.backend = "auto"
    check(attend(query, with_outliers, None, 0.125), naive(query, with_outliers, None, 0.125), with_outliers)


@pytest.mark.slow
@needs_x86_compiler
def test_portable_build_matches_the_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's loops for CPUs without AVX-512 (built for AVX2 here, ~40 s once) over part of both grids."""
    use_portable_build(monkeypatch)
    for bits, group, blocks, exact, sinks, batch, kv_heads, rep, queries in GRID[::2]:
        inputs = make_inputs(batch, kv_heads, blocks, max(exact, queries), sinks, *bits, group, backend="cpu")
        query = torch.randn(batch, kv_heads * rep, queries, 64, generator=torch.Generator().manual_seed(1))
        causal = attention_bias(None, batch, queries, inputs.total_tokens)
        check(attend(query, inputs, None, scaling=0.125), naive(query, inputs, causal, 0.125), inputs)
    for bits, group, value_group, dim, blocks, exact, kv_heads, rep, queries in WIDE_GRID:
        inputs = make_inputs(
            1, kv_heads, blocks, max(exact, queries), 1, *bits, group, dim=dim, backend="cpu", value_group=value_group
        )
        query = torch.randn(1, kv_heads * rep, queries, dim, generator=torch.Generator().manual_seed(2))
        causal = attention_bias(None, 1, queries, inputs.total_tokens)
        check(attend(query, inputs, None, scaling=dim**-0.5), naive(query, inputs, causal, dim**-0.5), inputs)


def test_reference_chunks_do_not_change_the_result() -> None:
    inputs = make_inputs(2, 2, 9, 4, 2, 4, 2, 32)
    query = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(3))
    whole = reference_attention(query, inputs, None, 0.125, chunk_tokens=1 << 20)
    for chunk in (32, 64, 96):
        torch.testing.assert_close(reference_attention(query, inputs, None, 0.125, chunk_tokens=chunk), whole)


def test_fully_masked_rows_give_zeros_not_nan() -> None:
    inputs = make_inputs(1, 1, 2, 3, 0, 4, 4, 32)
    query = torch.randn(1, 2, 1, 64)
    mask = torch.zeros(1, 1, 1, inputs.total_tokens, dtype=torch.bool)
    for backend in BACKENDS:
        inputs.backend = backend
        out = attend(query, inputs, mask, 0.125)
        assert torch.equal(out, torch.zeros_like(out)), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype: torch.dtype) -> None:
    inputs = make_inputs(1, 2, 3, 5, 1, 4, 4, 32, dtype=dtype)
    query = torch.randn(1, 4, 1, 64).to(dtype)
    expected = naive(query, inputs, None, 0.125)
    for backend in BACKENDS:
        inputs.backend = backend
        out = attend(query, inputs, None, 0.125)
        assert out.dtype == dtype
        tol = 4 * torch.finfo(dtype).eps * inputs.dense()[1].abs().max().item()  # one rounding of the output
        assert (out.double() - expected).abs().max().item() <= tol, backend
