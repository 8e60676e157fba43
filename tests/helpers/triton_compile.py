"""Compile the triton backend's kernels for an H100 (sm_90) on a machine without a GPU, and report their resources.

    python -m tests.helpers.triton_compile      # from the project root; TRITON_INTERPRET must not be set

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

from tests.helpers.inputs import Case

SM90 = 90
# The paths of the kernel, as attention cases (tests.helpers.inputs.Case): one row, tensor-core rows, 3-bit codes,
# a boolean mask, float32 exact tokens, head dim 256, and packed data stored rotated with codebooks (the float32
# rotated query and the level tables' gathers).
VARIANTS = [
    Case.parse(text)
    for text in (
        "k4v4-plain-g64 h2x1 d128 f16",
        "k4v4-plain-g64 h2x4 d128 bf16",
        "k3v2-plain-g32 h2x8 q2 d128 pad3",
        "k2v8-plain-g128 h1x1 d256 pad3 f16",
        "k4v4-plain-g64-rot-cb h2x1 d128 f16",
        "k3v2-plain-g32-rot-cb h2x4 d128 pad3 bf16",
    )
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
        for case in VARIANTS:
            inputs = case.inputs()
            mask = case.mask(inputs.total_tokens) if case.pad is not None else None
            triton_gpu.triton_attention(case.query(), inputs, mask, case.scaling)
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
