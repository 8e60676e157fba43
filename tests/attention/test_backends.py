"""Every attention backend against the definition (ggml's test-backend-ops): softmax(q·K·scaling + bias)·V over the
dequantized cache, in float64.

The inputs are real packed data (`PackedTensor.quantize`), so the comparison isolates the kernels' arithmetic. One
grid of cases, each a spec string (`tests.helpers.inputs.Case`): bits x key and value groups x rotation x codebook x
clip x outliers x sinks x layout, with odd lengths, batch, grouped-query ratios, head dims, model dtypes and, for
triton, the packed blocks per program; every case causal and padded, on every backend
(`tests.helpers.backends.KERNELS`). A backend computes every case within `tolerances.ATTENTION_REL_TOL` (one rounding
of the output in half precision), except what it does not read, which it refuses with the reason (`refusal`).
Triton runs on the GPU where there is one, else under Triton's interpreter (which checks indexing, unpacking,
masking, splitting and merging, not the compiler: tests/attention/test_triton.py does that).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from kvpack.attention import cpu, registry, triton_gpu
from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import reference_attention
from kvpack.attention.registry import attend, resolve_backend
from kvpack.config import CacheConfig
from kvpack.errors import BackendUnavailableError
from kvpack.quant.tensor import PackedTensor
from tests.helpers.backends import KERNELS, backend_params, why_unavailable
from tests.helpers.cases import CODEBOOKS, ROTATED, UNIFORM
from tests.helpers.inputs import Case, assert_close_to_definition, attention_definition, on, padding_mask

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TRITON_PATHS = [
    # one row (elementwise) or several (tensor cores), two token tiles per block, 3-bit codes across bytes, 9 and 18
    # rows (two row tiles), head dims that are not powers of two, exact tokens in three splits; one packed block
    # per program, so that the splits are merged
    "k4v4-plain-g16 h1x1 p3 e5 split1",
    "k4v4-plain-g64 h1x1 p3 e5 split1",
    "k2v2-plain-g32-s2 b2 h2x2 p2 e7 split1",
    "k3v3-plain-g16-s1 h2x3 p3 e3 split2",
    "k8v8-plain-g32 b2 h1x1 p2 e1 q3",
    "k4v2-plain-g16 h1x3 p4 e9 q3 split1",
    "k2v4-plain-g16 b2 p3 e5 d48 split1",
    "k3v8-plain-gk32-gv16-s2 h1x2 p2 e3 q3 d80 split1",
    "k8v3-plain-g16 h1x1 p1 e69 split1",
    "k4v4-plain-g16 h2x2 p0 e6",
    "k2v3-plain-g32-s1 h1x6 p3 e5 q3 split1",
    # rotated packed splits, each turned back on its own, merged with the exact splits
    "k4v4-plain-g16-s1-rotk h2x1 p3 e5 pad5 split1",
    "k4v2-plain-g16-s1-rotv h2x2 p3 e5 pad5 split1",
    "k2v4-plain-g16-s1-rot h2x1 p3 e5 q2 pad5 split1",
    "k3v3-plain-g16-s1-rot h2x2 p3 e5 d48 pad5 split1",
]
REFUSED_BY_KERNELS = [
    # outlier entries kept exact (`-o`): the torch backend reads them (rotated too); keys only, values only
    "k2v2-plain-g32-o1 b2 h2x3 p3 e5",
    "k3v3-plain-g16-s3-o2 b2 h2x3 p5 e2 q2",
    "k4v4-plain-g32-s1-o4 b2 h2x3 p2 e7",
    "k2v2-plain-g64-o2 b2 h2x3 p2 e1 q3",
    "k2v2-plain-g32-rot-o1 b2 h2x3 p3 e5",
    "k3v3-plain-g16-s3-rot-o2 b2 h2x3 p5 e2 q2",
    "k4v4-plain-g32-s1-rot-o4 b2 h2x3 p2 e7",
    "k2v2-plain-g64-rot-o2 b2 h2x3 p2 e1 q3",
    "k4v4-plain-g32-ok1 b2 p2 e3",
    "k4v4-plain-g32-ov1 b2 p2 e3",
    # keys per token: not the KIVI layout
    "k4v4-plain-g16-kt h2x2 p20 e5",
]
HALF = ["k4v4-plain-g32-s1 h2x2 p3 e5 f16", "k4v4-plain-g32-s1 h2x2 p3 e5 bf16"]
GRID = [Case.parse(text) for text in UNIFORM + TRITON_PATHS + ROTATED + CODEBOOKS + REFUSED_BY_KERNELS + HALF]
# Triton's interpreter (no GPU) takes ~1 ms per program: there triton computes its own paths, codebooks of 2 to 4 bits
# with and without rotation, and half precision, and refuses what it does not read; with a GPU, every case.
INTERPRETED = {*TRITON_PATHS, *CODEBOOKS[:4], *HALF, *REFUSED_BY_KERNELS}


def refusal(backend: str, config: CacheConfig) -> str | None:
    """What `backend` says when asked for packed data it does not read, or None when it must compute it: the fused
    kernels read the KIVI layout (keys per channel, values per token) without outlier entries; torch reads all."""
    if backend == "torch":
        return None
    if config.key.axis != "channel" or config.value.axis != "token":
        return "reads the KIVI layout only"
    if config.key.outliers or config.value.outliers:
        return "does not read outlier entries"
    return None


def device_for(backend: str, request: pytest.FixtureRequest) -> torch.device:
    """Where `backend` runs: triton on `triton_device` (the GPU, or the CPU under the interpreter), others the CPU."""
    return request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")


def run(
    backend: str, query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float,
    device: torch.device, split: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """`backend`'s output for CPU inputs, computed on `device`, back on the CPU. Triton with `split` packed blocks
    per program is called directly (the registry leaves the split to the kernel)."""
    inputs, query = on(inputs, device, backend), query.to(device)
    mask = None if mask is None else mask.to(device)
    if backend == "triton" and split is not None:
        return triton_gpu.triton_attention(query, inputs, mask, scaling, split_blocks=split).cpu()
    return attend(query, inputs, mask, scaling).cpu()


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("case", GRID, ids=str)
@pytest.mark.parametrize("backend", backend_params(*KERNELS))
def test_backend_matches_the_definition(backend: str, case: Case, masked: bool, request: pytest.FixtureRequest) -> None:
    device = device_for(backend, request)
    if backend == "triton" and device.type == "cpu" and case.name not in INTERPRETED:
        pytest.skip("triton on a GPU only: too slow for Triton's interpreter (INTERPRETED lists what it runs)")
    inputs, query = case.inputs(), case.query()
    mask = case.mask(inputs.total_tokens) if masked else None
    expected = attention_definition(query, inputs, mask, case.scaling)
    why = refusal(backend, case.config)
    if why is not None:
        with pytest.raises(BackendUnavailableError, match=why):
            run(backend, query, inputs, mask, case.scaling, device, case.split)
        return
    out = run(backend, query, inputs, mask, case.scaling, device, case.split)
    assert out.dtype == case.dtype
    assert_close_to_definition(out, expected, case.tolerance(inputs))


@pytest.mark.parametrize("backend", backend_params(*KERNELS))
def test_reads_strided_views_of_larger_buffers(backend: str, request: pytest.FixtureRequest) -> None:
    """The cache hands attention views of its capacity buffers: every stride is the buffer's, not the view's."""
    case = Case.parse("k4v2-plain-g16-s2 b2 h2x3 p5 e12")
    whole = case.inputs()
    assert whole.packed_keys is not None and whole.packed_values is not None
    keys, values = whole.packed_keys.slice_tokens(0, 48), whole.packed_values.slice_tokens(0, 48)
    inputs = AttentionInputs(whole.exact_keys[:, :, :9], whole.exact_values[:, :, :9], keys, values, sink_len=2)
    assert not inputs.exact_keys.is_contiguous() and not keys.codes.is_contiguous()
    query = case.query()
    out = run(backend, query, inputs, None, case.scaling, device_for(backend, request), split=2)
    assert_close_to_definition(out, attention_definition(query, inputs, None, case.scaling), case.tolerance(inputs))


@pytest.mark.parametrize("backend", backend_params(*KERNELS))
def test_additive_float_mask(backend: str, request: pytest.FixtureRequest) -> None:
    case = Case.parse("k4v4-plain-g16-s1 h2x2 p2 e5 q2")
    inputs = case.inputs()
    allowed = padding_mask(1, 2, inputs.total_tokens, pad=7)
    gen = torch.Generator().manual_seed(4)
    mask = torch.where(allowed, torch.randn(allowed.shape, generator=gen), torch.tensor(float("-inf")))
    query = case.query()
    out = run(backend, query, inputs, mask, case.scaling, device_for(backend, request), split=1)
    assert_close_to_definition(out, attention_definition(query, inputs, mask, case.scaling), case.tolerance(inputs))


@pytest.mark.parametrize("backend", backend_params(*KERNELS))
def test_a_fully_masked_row_gives_zeros_not_nan(backend: str, request: pytest.FixtureRequest) -> None:
    case = Case.parse("k4v4-plain-g32 b2 h1x2 p2 e3")
    inputs, query = case.inputs(), case.query()
    mask = torch.ones(2, 1, 1, inputs.total_tokens, dtype=torch.bool)
    mask[0] = False  # the first sample attends to nothing
    out = run(backend, query, inputs, mask, case.scaling, device_for(backend, request), split=1)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = attention_definition(query, inputs, mask, case.scaling)
    assert_close_to_definition(out[1:], expected[1:], case.tolerance(inputs))


def test_reference_chunks_do_not_change_the_result() -> None:
    case = Case.parse("k4v2-plain-g32-s2 b2 h2x2 p9 e4")
    inputs, query = case.inputs(), case.query(seed=3)
    whole = reference_attention(query, inputs, None, 0.125, chunk_tokens=1 << 20)
    for chunk in (32, 64, 96):
        torch.testing.assert_close(reference_attention(query, inputs, None, 0.125, chunk_tokens=chunk), whole)


def without_outliers(packed: PackedTensor) -> PackedTensor:
    """The same codes, scales and zeros read as if no entry were kept apart."""
    return replace(packed, spec=replace(packed.spec, outliers=0), outlier_values=None, outlier_positions=None)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("case", [case for case in GRID if case.outliers], ids=str)
def test_the_reference_reads_outlier_entries_in_every_chunk(case: Case, masked: bool) -> None:
    inputs, query = case.inputs(backend="torch"), case.query()
    mask = case.mask(inputs.total_tokens) if masked else None
    expected = attention_definition(query, inputs, mask, case.scaling)
    tolerance = case.tolerance(inputs)
    # Chunk boundaries inside the packed tokens: the chunked reference slices the outliers with their groups.
    chunk = case.config.block_tokens
    assert_close_to_definition(reference_attention(query, inputs, mask, case.scaling, chunk), expected, tolerance)
    # The definition reads the kept entries: without them it is another result, far beyond the tolerance.
    assert inputs.packed_keys is not None and inputs.packed_values is not None
    stripped = replace(
        inputs, packed_keys=without_outliers(inputs.packed_keys), packed_values=without_outliers(inputs.packed_values)
    )
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_definition(attend(query, stripped, mask, case.scaling), expected, tolerance)


def test_auto_reads_outliers_with_torch_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(registry, "_fallbacks_said", set())
    case = Case.parse("k2v2-plain-g32-o1 b2 h2x3 p2 e3")
    inputs, query = case.inputs(backend="auto"), case.query()
    assert resolve_backend(inputs) == "torch"
    said = capsys.readouterr().err
    if cpu.why_unavailable() is None:
        assert "attention backend 'cpu' skipped: the CPU kernel does not read outlier entries" in said
    if why_unavailable("numba") is None:
        assert "attention backend 'numba' skipped: the numba kernel does not read outlier entries" in said
    expected = attention_definition(query, inputs, None, case.scaling)
    assert_close_to_definition(attend(query, inputs, None, case.scaling), expected, case.tolerance(inputs))
    for backend in ("cpu", "numba"):
        with pytest.raises(BackendUnavailableError, match=f"'{backend}' cannot run here"):
            resolve_backend(replace(inputs, backend=backend))


@pytest.mark.parametrize("blocks", [0, 1])
def test_cpu_kernels_refuse_tensors_off_the_cpu(blocks: int) -> None:
    """So that `auto` never hands a CUDA cache to a CPU kernel (even one with nothing packed yet)."""
    from kvpack.attention import numba_cpu

    inputs = Case.parse(f"k4v4-plain-g16 h1x1 p{blocks} e2").inputs()
    inputs.exact_keys = torch.empty(1, 1, 2, 64, device="meta")  # stands for a CUDA tensor: any non-CPU device
    for supports in (cpu.supports, numba_cpu.supports):
        assert "CPU tensors only" in str(supports(inputs))


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine() != "x86_64" or cpu.why_unavailable() is not None, reason="needs an x86-64 C++ compiler"
)
@pytest.mark.parametrize(("march", "path"), [("x86-64-v3", "AVX2 intrinsics"), ("x86-64", "portable loops")])
def test_portable_build_matches_the_definition(march: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cpu kernel's code paths for CPUs without AVX-512 (~40 s to build each, once), over every case of the grid
    it reads, causal: AVX2's intrinsics, and the plain loops the compiler vectorises elsewhere (NEON), built here
    for x86-64 without AVX."""
    portable = cpu.extension(march)
    assert portable.simd_path() == path
    monkeypatch.setattr(cpu, "extension", lambda: portable)
    for case in GRID:
        if refusal("cpu", case.config) is None:
            inputs, query = case.inputs(backend="cpu"), case.query()
            out = attend(query, inputs, None, case.scaling)
            expected = attention_definition(query, inputs, None, case.scaling)
            assert_close_to_definition(out, expected, case.tolerance(inputs))


def test_the_numba_kernel_keeps_torchs_thread_count() -> None:
    """Starting numba's threading layer resets torch's thread count to the cores; the kernel sets it back, so a
    user's `torch.set_num_threads` holds (checked in a fresh process: the reset happens on the first call only)."""
    pytest.importorskip("numba")
    code = (
        "import torch\n"
        "from kvpack.attention.inputs import AttentionInputs\n"
        "from kvpack.attention.numba_cpu import numba_attention\n"
        "torch.set_num_threads(1)\n"
        "k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)\n"
        "numba_attention(torch.randn(1, 4, 1, 32), AttentionInputs(k, v, None, None, 0), None, 32**-0.5)\n"
        "print(torch.get_num_threads())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1"


def test_the_cpu_kernel_runs_on_torchs_threads() -> None:
    """The C++ kernel is built with OpenMP, so `at::parallel_for` splits its work over torch's thread count (without
    it, ATen's inline `parallel_for` runs serially whatever the count)."""
    if cpu.why_unavailable() is not None:
        pytest.skip(cpu.why_unavailable())
    kernel, before = cpu.extension(), torch.get_num_threads()
    try:
        for threads in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(threads)
            assert kernel.parallel_threads(64) == threads
    finally:
        torch.set_num_threads(before)
