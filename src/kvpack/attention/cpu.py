"""The fused CPU backend: a C++ kernel (`csrc/packed_attention.cpp`) built on first use for the machine it runs on.

Why C++ built here: register-blocked loops (AVX-512 or AVX2 intrinsics, plain loops the compiler vectorises
elsewhere) read a 4-bit cache several times faster than numba's best formulation and faster than float32 SDPA (see
`kvpack bench decode`). It is compiled with torch's extension tooling and `-march=native`, so it uses whatever
the CPU has (AVX-512, AVX2, NEON) and never an instruction it lacks; the build is cached per source, compiler
flags and CPU (a machine with another CPU builds its own). It needs a C++ compiler; without one, `auto` falls back
to the numba kernel (`kvpack.attention.numba_cpu`) and says so once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from kvpack.attention import op
from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import attention_bias

SOURCE = Path(__file__).parent / "csrc" / "packed_attention.cpp"
CFLAGS = ["-O3", "-fno-math-errno"]
# Integer products (AVX-512 VNNI and VBMI, where the CPU has them: the kernel's `integer_products()` says): 2- and
# 4-bit uniform codes are multiplied as integers, the query (for keys) and the attention weights times the value
# scales (for values) rounded to two 8-bit digits per packed block and row, an added error ~1e-4 of the output's
# (tests/quant/tolerances.py states its bound). Off by default: side by side on a 2-core Xeon (`kvpack bench
# decode`'s `cpu op` rows) they were no faster than the float products (330 vs 316 µs at 8k tokens on 2 threads, 560
# vs 586 on 1): the multiplies are no longer what limits the kernel. KVPACK_INTEGER_PRODUCTS=1 in the environment (or
# setting this) turns them on; a cache layer reads it when it first attends.
integer_products: bool = os.environ.get("KVPACK_INTEGER_PRODUCTS", "0") == "1"
# OpenMP, at compile and link time: ATen's `parallel_for` is an inline template that runs serially unless _OPENMP is
# defined where it is compiled. The built library needs `libgomp.so.1`, which torch's CPU build has already loaded
# (torch/lib), so the kernel's threads are torch's, sized by `torch.set_num_threads`.
OPENMP_FLAGS = ["-fopenmp"]


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU model and feature flags (Linux), else the platform's description."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cpu_model() -> str:
    """The CPU's model name (`model name` in /proc/cpuinfo on Linux), else "" where it does not say."""
    lines = _cpu_identity().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def cpu_simd() -> list[str]:
    """The SIMD extensions the CPU reports that the kernel's code paths care about (Linux; empty where it does not
    say), e.g. ["avx2", "fma", "f16c"]."""
    identity = _cpu_identity()
    flags = set(" ".join(line.split(":", 1)[1] for line in identity.splitlines() if ":" in line).split())
    names = ("avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "avx2", "fma", "f16c", "asimd", "neon")
    return [name for name in names if name in flags]


def build_flags(march: str = "native", openmp: bool = True) -> list[str]:
    """The compiler flags of a build of the kernel for `march`, with or without OpenMP (see `extension`)."""
    return [*CFLAGS, *(OPENMP_FLAGS if openmp else ["-fopenmp-simd"]), f"-march={march}"]


def compiler() -> str | None:
    """The C++ compiler torch's extension tooling would use, if one is on PATH."""
    name = os.environ.get("CXX", "c++")
    return shutil.which(name) or shutil.which("g++") or shutil.which("clang++")


@cache
def extension(march: str = "native", openmp: bool = True) -> Any:
    """Build (first use on this machine: ~30-45 s, announced on stderr) or load the compiled kernel.

    march: the target of `-march`; `native` (the default) is this CPU. Tests also build an older target (e.g.
    `x86-64-v3`, AVX2 without AVX-512; `x86-64`, no AVX) to check the kernel's other code paths on a machine that has
    more.
    openmp: build with OpenMP (the default: the kernel splits its work over torch's threads); False builds the
    single-threaded kernel, for the benchmark that compares the two.
    """
    from torch.utils.cpp_extension import _get_build_directory, load

    threads = OPENMP_FLAGS if openmp else ["-fopenmp-simd"]
    flags = build_flags(march, openmp)
    if march == "native" and openmp:
        flags.append("-DKVPACK_REGISTER_OP")  # the default build is the operator's CPU kernel (see op.py)
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


Runner = Callable[[torch.Tensor, AttentionInputs, "torch.Tensor | None", float], torch.Tensor]


def runner(inputs: AttentionInputs) -> Runner:
    """`cpu_attention` for every step of the layer that `inputs` come from: the kernel loaded and the layer's
    `op.Constants` worked out once, each call is one call of the `kvpack::packed_attention` operator."""
    extension()  # loading the default build registers the operator's CPU kernel
    operator = torch.ops.kvpack.packed_attention.default
    pk, pv = inputs.packed_keys, inputs.packed_values
    constants = None if pk is None or pv is None else op.Constants.of(pk, pv)
    integer = integer_products

    def run(query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        batch, _, queries, _ = query.shape
        bias = None if mask is None and queries == 1 else attention_bias(mask, batch, queries, inputs.total_tokens)
        if query.dtype == torch.float32 and inputs.exact_keys.dtype == torch.float32:
            return operator(*op.arguments(query, inputs, bias, scaling, constants, integer))
        # The kernel reads float32: a half-precision model's query and exact tokens are converted.
        inputs = replace(inputs, exact_keys=inputs.exact_keys.float(), exact_values=inputs.exact_values.float())
        return operator(*op.arguments(query.float(), inputs, bias, scaling, constants, integer)).to(query.dtype)

    return run


def cpu_attention(
    query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """`reference_attention`, computed by the C++ kernel. Same shapes and result (within float error).

    Packed keys stored rotated (`QuantSpec.rotation`) are scored with the query rotated the same way; packed values
    stored rotated are turned back once, in the kernel's merge of its partial results. Codes of a codebook
    (`QuantSpec.codebook`) are read through its level table. A cache layer calls `runner` once instead.
    """
    return runner(inputs)(query, inputs, mask, scaling)
