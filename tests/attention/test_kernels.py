"""Every attention backend against the definition: softmax(q·K·scaling + bias)·V over the dequantized cache.

The inputs are real packed data (`PackedTensor.quantize`), so the comparison isolates the kernels' arithmetic:
the naive dense computation here, the chunked torch reference, and the fused CPU kernel must agree within
`ATTENTION_REL_TOL` over bits x group sizes x odd lengths x batch x grouped-query ratios x sinks x masks.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvpack.attention import cpu
from kvpack.attention.reference import reference_attention
from kvpack.attention.registry import attend
from tests.attention.inputs import check, make_inputs, naive, padding_mask

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
    from kvpack.attention.reference import attention_bias

    expected = naive(query, inputs, attention_bias(mask, batch, queries, tokens), scaling=0.125)
    check(attend(query, inputs, mask, scaling=0.125), expected, inputs)


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
