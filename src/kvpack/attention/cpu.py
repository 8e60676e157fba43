"""The fused CPU backend: a C++ kernel (`csrc/packed_attention.cpp`) built on first use for the machine it runs on.

Why C++ built here: measured on a 2-core AVX-512 machine, register-blocked loops that the compiler vectorises
read a 4-bit cache several times faster than numba's best formulation and faster than float32 SDPA (see
`kvpack bench decode`). It is compiled with torch's extension tooling and `-march=native`, so it uses whatever
the CPU has (AVX-512, AVX2, NEON) and never an instruction it lacks; the build is cached per source, compiler
flags and CPU (a machine with another CPU builds its own). It needs a C++ compiler; without one, `auto` falls back
to the numba kernel (`kvpack.attention.numba_cpu`) and says so once.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import attention_bias
from kvpack.quant.rotation import rotate, rotation_matrix

SOURCE = Path(__file__).parent / "csrc" / "packed_attention.cpp"
CFLAGS = ["-O3", "-fno-math-errno"]
# OpenMP, at compile and link time: ATen's `parallel_for` is an inline template that runs serially unless _OPENMP is
# defined where it is compiled. The built library needs `libgomp.so.1`, which torch's CPU build has already loaded
# (torch/lib), so the kernel's threads are torch's, sized by `torch.set_num_threads`.
OPENMP_FLAGS = ["-fopenmp"]
# Items per thread: enough to balance uneven chunks, few enough that each reads a long run of blocks.
_ITEMS_PER_THREAD = 4
_MIN_CHUNK_TOKENS = 256


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU model and feature flags (Linux), else the platform's description."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def compiler() -> str | None:
    """The C++ compiler torch's extension tooling would use, if one is on PATH."""
    import os

    name = os.environ.get("CXX", "c++")
    return shutil.which(name) or shutil.which("g++") or shutil.which("clang++")


@cache
def extension(march: str = "native", openmp: bool = True) -> Any:
    """Build (first use on this machine: ~30-45 s, announced on stderr) or load the compiled kernel.

    march: the target of `-march`; `native` (the default) is this CPU. Tests also build an older target (e.g.
    `x86-64-v3`, AVX2 without AVX-512) to check the kernel's portable code paths on a machine that has more.
    openmp: build with OpenMP (the default: the kernel splits its work over torch's threads); False builds the
    single-threaded kernel, for the benchmark that compares the two.
    """
    from torch.utils.cpp_extension import _get_build_directory, load

    threads = OPENMP_FLAGS if openmp else ["-fopenmp-simd"]
    flags = [*CFLAGS, *threads, f"-march={march}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_identity().encode()).hexdigest()
    name = f"kvpack_attention_{key[:16]}"
    built = (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    start = time.perf_counter()
    if not built:
        print(
            "kvpack: compiling the CPU attention kernel for this machine (once; ~30-45 s) ...",
            file=sys.stderr,
            flush=True,
        )
    module = load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=threads, verbose=False)
    if not built:
        print(f"kvpack: CPU attention kernel ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return module


@cache
def why_unavailable() -> str | None:
    """None when the C++ backend can be built here, else why not (checked once per process)."""
    if compiler() is None:
        return "no C++ compiler on PATH for the CPU kernel"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is missing (pip install ninja), so the CPU kernel cannot be built"
    return None


_EMPTY = torch.empty(0)  # stands for absent tensors (no bias, nothing packed yet); the kernel never writes it


@cache
def _row_query(rows: int, queries: int) -> torch.Tensor:
    """The new token (mask row) of each query row: the same few small tensors at every decode step."""
    return torch.arange(rows) % queries


def supports(inputs: AttentionInputs) -> str | None:
    """None when the kernel handles `inputs`, else why not."""
    if inputs.exact_keys.device.type != "cpu":
        return "the CPU kernel runs on CPU tensors only"
    dim, value_dim = inputs.exact_keys.shape[-1], inputs.exact_values.shape[-1]
    if dim % 16 or value_dim % 16:
        return f"the CPU kernel needs head dims that are multiples of 16 (got {dim} and {value_dim})"
    if inputs.packed_keys is None or inputs.packed_values is None:
        return None
    key, value = inputs.packed_keys.spec, inputs.packed_values.spec
    if key.axis != "channel" or value.axis != "token":
        return "the CPU kernel reads the KIVI layout only (keys per channel, values per token)"
    if key.outliers or value.outliers:
        return "the CPU kernel does not read outlier entries ('-o' specs; the torch backend does)"
    if key.group_size % 16:
        return f"the CPU kernel needs a key group size that is a multiple of 16 (got {key.group_size})"
    return None


def cpu_attention(
    query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """`reference_attention`, computed by the C++ kernel. Same shapes and result (within float error).

    Packed keys stored rotated (`QuantSpec.rotation`) are scored with the query rotated the same way; packed values
    stored rotated are turned back once, in the kernel's merge of its partial results. Codes of a codebook
    (`QuantSpec.codebook`) are read through its level table.
    """
    kernel = extension()
    batch, heads, queries, dim = query.shape
    kv_heads = inputs.exact_keys.shape[1]
    rows = heads // kv_heads * queries
    q = (query.float() * scaling).reshape(batch, kv_heads, rows, dim).contiguous()
    row_query = _row_query(rows, queries)
    bias = attention_bias(mask, batch, queries, inputs.total_tokens)
    bias = _EMPTY if bias is None else bias.float()
    pk, pv = inputs.packed_keys, inputs.packed_values
    empty = _EMPTY
    exact_keys = inputs.exact_keys if inputs.exact_keys.dtype == torch.float32 else inputs.exact_keys.float()
    exact_values = inputs.exact_values if inputs.exact_values.dtype == torch.float32 else inputs.exact_values.float()
    if pk is None or pv is None:
        out = kernel.packed_attention(
            q, q, row_query, empty, empty, empty, empty, empty, empty, 0, exact_keys, exact_values, bias,
            inputs.sink_len, 8, 8, 16, 1, empty, empty, empty,
        )  # fmt: skip
    else:
        blocks = pk.codes.shape[2]
        threads = torch.get_num_threads()
        chunks_per_head = max(1, -(-_ITEMS_PER_THREAD * threads // (batch * kv_heads)))
        group = pk.spec.group_size
        chunk_blocks = max(-(-blocks // chunks_per_head), -(-_MIN_CHUNK_TOKENS // group), 1)
        q_packed = q if pk.spec.rotation == "none" else rotate(q, pk.spec.rotation).contiguous()
        value_rotation = empty if pv.spec.rotation == "none" else rotation_matrix(pv.shape[-1])
        key_levels = empty if pk.levels is None else pk.levels  # codebooks: code c reads as level[c]
        value_levels = empty if pv.levels is None else pv.levels
        out = kernel.packed_attention(
            q, q_packed, row_query, pk.codes, pk.scale, pk.zero, pv.codes, pv.scale, pv.zero, blocks, exact_keys,
            exact_values, bias, inputs.sink_len, pk.spec.bits, pv.spec.bits, pv.spec.group_size, chunk_blocks,
            value_rotation, key_levels, value_levels,
        )  # fmt: skip
    value_dim = inputs.exact_values.shape[-1]
    return out.reshape(batch, heads, queries, value_dim).transpose(1, 2).to(query.dtype)
