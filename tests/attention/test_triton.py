"""The triton backend against the definition, and what can be checked of it without a GPU.

With a GPU the kernels run on it. Without one they run under Triton's interpreter (TRITON_INTERPRET=1) on CPU
tensors: the same kernel code executed with numpy, which checks the indexing, unpacking, masking, splitting and
merging, but neither Triton's compiler nor speed. `test_kernels_compile_for_hopper` runs the compiler, for sm_90,
on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from kvpack import KVPackCache
from kvpack.attention import triton_gpu
from kvpack.attention.reference import AttentionInputs, attention_bias
from kvpack.attention.registry import attend, resolve_backend
from kvpack.errors import BackendUnavailableError
from tests.attention.inputs import check, make_inputs, naive, on, padding_mask
from tests.attention.test_fused_cache import FUSED_LOGIT_TOL, step_logits
from tests.attention.test_outlier_attention import outlier_inputs
from tests.attention.triton_compile import VARIANTS
from tests.cache.test_cache import llama_config, prompt

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()


def run(
    inputs: AttentionInputs, query: torch.Tensor, mask: torch.Tensor | None, device: torch.device,
    split_blocks: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The triton backend's output for CPU inputs, on `device`, back on the CPU."""
    mask = None if mask is None else mask.to(device)
    out = triton_gpu.triton_attention(query.to(device), on(inputs, device), mask, 0.125, split_blocks=split_blocks)
    return out.cpu()


GRID = [
    # bits (k, v), key group, value group, packed blocks, exact tokens, sinks, batch, kv heads, query heads per kv
    # head, queries, padded, head dim, packed blocks per program (None: the default split)
    ((4, 4), 16, 16, 3, 5, 0, 1, 1, 1, 1, False, 64, 1),  # one row: the elementwise path; 3 packed splits
    ((4, 4), 64, 64, 3, 5, 0, 1, 1, 1, 1, True, 64, 1),  # two token tiles per block
    ((2, 2), 32, 32, 2, 7, 2, 2, 2, 2, 1, True, 64, 1),  # two rows: the tensor-core path; sinks; batch 2
    ((3, 3), 16, 16, 3, 3, 1, 1, 2, 3, 1, False, 64, 2),  # 3-bit codes straddle bytes
    ((8, 8), 32, 32, 2, 1, 0, 2, 1, 1, 3, True, 64, None),  # three new tokens
    ((4, 2), 16, 16, 4, 9, 0, 1, 1, 3, 3, True, 64, 1),  # 9 rows
    ((2, 4), 16, 16, 3, 5, 0, 2, 2, 1, 1, False, 48, 1),  # head dim not a power of two
    ((3, 8), 32, 16, 2, 3, 2, 1, 1, 2, 3, False, 80, 1),  # causal among new tokens without a mask; value groups 16
    ((8, 3), 16, 16, 1, 69, 0, 1, 1, 1, 1, False, 64, 1),  # exact tokens in three splits, the last one partial
    ((4, 4), 16, 16, 0, 6, 0, 1, 2, 2, 1, True, 64, None),  # nothing packed yet
    ((2, 3), 32, 32, 3, 5, 1, 1, 1, 6, 3, True, 64, 1),  # 18 rows: two row tiles
]


@pytest.mark.parametrize(
    ("bits", "group", "value_group", "blocks", "exact", "sinks", "batch", "kv_heads", "rep", "queries", "padded",
     "dim", "split_blocks"), GRID,
)  # fmt: skip
def test_matches_the_definition(
    triton_device: torch.device, bits: tuple[int, int], group: int, value_group: int, blocks: int, exact: int,
    sinks: int, batch: int, kv_heads: int, rep: int, queries: int, padded: bool, dim: int, split_blocks: int | None,
) -> None:  # fmt: skip
    inputs = make_inputs(batch, kv_heads, blocks, exact, sinks, *bits, group, dim=dim, value_group=value_group)
    query = torch.randn(batch, kv_heads * rep, queries, dim, generator=torch.Generator().manual_seed(1))
    tokens = inputs.total_tokens
    mask = padding_mask(batch, queries, tokens, pad=min(tokens - 1, sinks + group + 3)) if padded else None
    expected = naive(query, inputs, attention_bias(mask, batch, queries, tokens), scaling=0.125)
    check(run(inputs, query, mask, triton_device, split_blocks), expected, inputs)


def test_reads_strided_views_of_larger_buffers(triton_device: torch.device) -> None:
    """The cache hands attention views of its capacity buffers: every stride is the buffer's, not the view's."""
    whole = make_inputs(2, 2, 5, 12, 2, 4, 2, 16)
    assert whole.packed_keys is not None and whole.packed_values is not None
    keys, values = whole.packed_keys.slice_tokens(0, 48), whole.packed_values.slice_tokens(0, 48)
    inputs = AttentionInputs(whole.exact_keys[:, :, :9], whole.exact_values[:, :, :9], keys, values, sink_len=2)
    assert not inputs.exact_keys.is_contiguous() and not keys.codes.is_contiguous()
    query = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(2))
    check(run(inputs, query, None, triton_device, split_blocks=2), naive(query, inputs, None, 0.125), inputs)


def test_additive_float_mask(triton_device: torch.device) -> None:
    inputs = make_inputs(1, 2, 2, 5, 1, 4, 4, 16)
    tokens = inputs.total_tokens
    allowed = padding_mask(1, 2, tokens, pad=7)
    gen = torch.Generator().manual_seed(4)
    mask = torch.where(allowed, torch.randn(allowed.shape, generator=gen), torch.tensor(float("-inf")))
    query = torch.randn(1, 4, 2, 64, generator=gen)
    expected = naive(query, inputs, attention_bias(mask, 1, 2, tokens), 0.125)
    check(run(inputs, query, mask, triton_device, split_blocks=1), expected, inputs)


def test_fully_masked_row_gives_zeros(triton_device: torch.device) -> None:
    inputs = make_inputs(2, 1, 2, 3, 0, 4, 4, 32)
    mask = torch.ones(2, 1, 1, inputs.total_tokens, dtype=torch.bool)
    mask[0] = False  # the first sample attends to nothing
    query = torch.randn(2, 2, 1, 64, generator=torch.Generator().manual_seed(5))
    out = run(inputs, query, mask, triton_device, split_blocks=1)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check(out[1:], naive(query, inputs, attention_bias(mask, 2, 1, inputs.total_tokens), 0.125)[1:], inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(triton_device: torch.device, dtype: torch.dtype) -> None:
    inputs = make_inputs(1, 2, 3, 5, 1, 4, 4, 32, dtype=dtype)
    query = torch.randn(1, 4, 1, 64).to(dtype)
    out = run(inputs, query, None, triton_device)
    assert out.dtype == dtype
    tol = 4 * torch.finfo(dtype).eps * inputs.dense()[1].abs().max().item()  # one rounding of the output
    assert (out.double() - naive(query, inputs, None, 0.125)).abs().max().item() <= tol


def test_attend_runs_triton_when_asked_and_auto_keeps_cpu_tensors_on_cpu_kernels(triton_device: torch.device) -> None:
    inputs = on(make_inputs(1, 2, 2, 3, 0, 4, 4, 16), triton_device)
    query = torch.randn(1, 4, 1, 64).to(triton_device)
    expected = naive(query.cpu(), on(inputs, torch.device("cpu")), None, 0.125)
    check(attend(query, inputs, None, 0.125).cpu(), expected, inputs)
    inputs.backend = "auto"
    assert (resolve_backend(inputs) == "triton") == ON_GPU  # CPU tensors never go to the interpreter by themselves


ROTATED = [
    # key rotation, value rotation, bits (k, v), head dim, query heads per kv head, queries
    ("hadamard", "none", (4, 4), 64, 1, 1),  # keys only; one row: the elementwise path
    ("none", "hadamard", (4, 2), 64, 2, 1),  # values only; two rows: the tensor-core path
    ("hadamard", "hadamard", (2, 4), 64, 1, 2),  # both; two new tokens
    ("hadamard", "hadamard", (3, 3), 48, 2, 1),  # head dim not a power of two: a random orthogonal matrix
]


@pytest.mark.parametrize(("key_rotation", "value_rotation", "bits", "dim", "rep", "queries"), ROTATED)
def test_reads_rotated_packed_data(
    triton_device: torch.device, key_rotation: str, value_rotation: str, bits: tuple[int, int], dim: int, rep: int,
    queries: int,
) -> None:  # fmt: skip
    """Packed data stored rotated, with exact sinks and residual that are not: three packed splits (each turned back
    on its own) and the exact splits merged."""
    inputs = make_inputs(1, 2, 3, 5, 1, *bits, 16, dim=dim, key_rotation=key_rotation, value_rotation=value_rotation)
    query = torch.randn(1, 2 * rep, queries, dim, generator=torch.Generator().manual_seed(7))
    mask = padding_mask(1, queries, inputs.total_tokens, pad=5)
    expected = naive(query, inputs, attention_bias(mask, 1, queries, inputs.total_tokens), scaling=0.125)
    check(run(inputs, query, mask, triton_device, split_blocks=1), expected, inputs)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_refuses_outliers_with_a_reason(triton_device: torch.device, rotation: str) -> None:
    inputs = on(outlier_inputs(4, 1, 16, 2, 3, 0, rotation=rotation, backend="triton"), triton_device)
    with pytest.raises(BackendUnavailableError, match="does not read outlier entries"):
        attend(torch.randn(2, 2, 1, 64).to(triton_device), inputs, None, 0.125)


@pytest.mark.skipif(ON_GPU, reason="this machine has a GPU")
def test_asking_for_triton_without_a_gpu_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(1, 1, 1, 2, 0, 4, 4, 16, backend="triton")
    with pytest.raises(BackendUnavailableError, match="'triton' cannot run here: no CUDA GPU"):
        attend(torch.randn(1, 1, 1, 64), inputs, None, 0.125)


@pytest.mark.parametrize("packed_blocks", [0, 1])
def test_cpu_backends_refuse_cuda_tensors(packed_blocks: int) -> None:
    """So that `auto` never hands a CUDA cache to a CPU kernel (even one with nothing packed yet)."""
    from kvpack.attention import cpu, numba_cpu

    inputs = make_inputs(1, 1, packed_blocks, 2, 0, 4, 4, 16)
    inputs.exact_keys = torch.empty(1, 1, 2, 64, device="meta")  # stands for a CUDA tensor: any non-CPU device
    for supports in (cpu.supports, numba_cpu.supports):
        assert "CPU tensors only" in str(supports(inputs))


@pytest.mark.parametrize("spec", ["k4v2-g16-r16-s2", "k4v2-g16-r16-s2-rot-cb"])
def test_fused_cache_generates_as_the_dense_path(triton_device: torch.device, spec: str) -> None:
    """End to end in a tiny model: decode steps of 1-3 tokens read the packed cache through the triton kernel
    (plain, and rotated with codebooks as the recommended configs are)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval().to(triton_device)
    ids = prompt(batch=2, tokens=56, seed=3).to(triton_device)
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(model, spec, backend="triton")
    fused = step_logits(model, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    assert all(layer.packed_length > 0 for layer in cache.layers if hasattr(layer, "packed_length"))


def test_kernels_compile_for_hopper() -> None:
    """The kernels go through Triton's compiler for sm_90 (no GPU needed): the interpreter never runs it."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.attention.triton_compile"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = [line for line in result.stdout.splitlines() if '"kernel": "partials"' in line]
    assert len(kernels) == len(VARIANTS), result.stdout
