"""Compile the triton backend's kernels for an H100 (sm_90) on a machine without a GPU, and report their resources.

    python -m tests.attention.triton_compile      # from the project root; TRITON_INTERPRET must not be set

Triton's interpreter, which the tests use where there is no GPU, runs kernels with numpy and never calls Triton's
compiler: it cannot see code the compiler rejects, nor registers and spills. This runs the real compiler (Triton's
front end, LLVM, and the ptxas that ships with triton) through the same launch path as a real call
(`triton_attention` -> `JITFunction.warmup`), with a stand-in driver that names an sm_90 target, and reports what
ptxas says of each kernel variant. Nothing is launched and no result is computed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tests.attention.inputs import make_inputs, padding_mask

SM90 = 90
# Packed data stored rotated, with codebooks: the float32 rotated query and the level tables' gathers.
_ROTATED_CODEBOOKS = {
    "key_rotation": "hadamard", "value_rotation": "hadamard", "key_codebook": "lloyd1", "value_codebook": "lloyd1",
}  # fmt: skip
# (key bits, value bits), group, kv heads, query heads per kv head, queries, padded, head dim, dtype, and what else
# `make_inputs` is asked: the paths of the kernel (one row, tensor-core rows, 3-bit codes, bool mask, float32 exact
# tokens, head dim 256, codebooks on both paths).
VARIANTS = [
    ((4, 4), 64, 2, 1, 1, False, 128, torch.float16, {}),
    ((4, 4), 64, 2, 4, 1, False, 128, torch.bfloat16, {}),
    ((3, 2), 32, 2, 8, 2, True, 128, torch.float32, {}),
    ((2, 8), 128, 1, 1, 1, True, 256, torch.float16, {}),
    ((4, 4), 64, 2, 1, 1, False, 128, torch.float16, _ROTATED_CODEBOOKS),
    ((3, 2), 32, 2, 4, 1, True, 128, torch.bfloat16, _ROTATED_CODEBOOKS),
]


class _Sm90Driver:
    """The part of a Triton driver that compiling needs: a current device, stream and target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", SM90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class _Compile:
    """Stands for a kernel in `kernel[grid](...)`: compiles it for the stand-in target instead of launching it."""

    def __init__(self, kernel: Any, compiled: list[tuple[str, dict[str, Any], Any]]) -> None:
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def compile_only(*args: Any, **kwargs: Any) -> None:
            binary = self.kernel.warmup(*args, grid=grid, **kwargs)
            self.compiled.append((self.kernel.fn.__name__, kwargs, binary))

        return compile_only


@contextmanager
def _compiling_for_sm90() -> Iterator[list[tuple[str, dict[str, Any], Any]]]:
    """Launches of the backend's kernels compile them for sm_90 instead. The stand-in driver stays active after
    (Triton cannot go back to no driver on a machine without a GPU): run this in a process of its own."""
    from triton.runtime import driver

    from kvpack.attention import triton_gpu

    kernels = triton_gpu._kernels()
    compiled: list[tuple[str, dict[str, Any], Any]] = []
    originals = kernels.partials, kernels.merge
    driver.set_active(_Sm90Driver())
    kernels.partials, kernels.merge = _Compile(originals[0], compiled), _Compile(originals[1], compiled)
    try:
        yield compiled
    finally:
        kernels.partials, kernels.merge = originals


def _ptxas_report(ptx: str) -> dict[str, int]:
    """Registers and spilled bytes of the PTX's kernel according to triton's own ptxas."""
    from triton import knobs

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run(
            [knobs.nvidia.ptxas.path, f"--gpu-name=sm_{SM90}a", "-v", source.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = {}
    for name, pattern in (("registers", r"Used (\d+) registers"), ("spill_bytes", r"(\d+) bytes spill stores")):
        found = re.search(pattern, result.stderr)
        assert found is not None, result.stderr
        report[name] = int(found.group(1))
    return report


def compile_variants() -> list[dict[str, Any]]:
    """Each kernel of each variant compiled for sm_90: its constexprs, warps, shared memory and ptxas' report."""
    from kvpack.attention import triton_gpu

    if triton_gpu.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = []
    with _compiling_for_sm90() as compiled:
        for bits, group, kv_heads, rep, queries, padded, dim, dtype, options in VARIANTS:
            inputs = make_inputs(1, kv_heads, 2, 5, 0, *bits, group, dim=dim, dtype=dtype, **options)
            query = torch.zeros(1, kv_heads * rep, queries, dim, dtype=dtype)
            mask = padding_mask(1, queries, inputs.total_tokens, pad=3) if padded else None
            triton_gpu.triton_attention(query, inputs, mask, 0.1)
    for name, kwargs, binary in compiled:
        constexprs = {key: value for key, value in kwargs.items() if key.isupper()}
        rows.append(
            {
                "kernel": name,
                **constexprs,
                "num_warps": binary.metadata.num_warps,
                "shared_bytes": binary.metadata.shared,
                **_ptxas_report(binary.asm["ptx"]),
            }
        )
    return rows


if __name__ == "__main__":
    for row in compile_variants():
        print(json.dumps(row), file=sys.stdout)
