"""The triton backend beyond the grid of tests/attention/test_backends.py (which checks its results): how the registry
reaches it, what it says without a GPU, a tiny model decoding through it, and Triton's compiler for sm_90.

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

from kvpack import KVPackCache
from kvpack.attention.registry import attend, resolve_backend
from kvpack.errors import BackendUnavailableError
from tests.helpers.generation import step_logits
from tests.helpers.inputs import Case, assert_close_to_definition, attention_definition, on
from tests.helpers.models import prompt, tiny_llama
from tests.helpers.states import packed_layers
from tests.helpers.triton_compile import VARIANTS
from tests.quant.tolerances import FUSED_LOGIT_TOL

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()


def test_attend_runs_triton_when_asked_and_auto_keeps_cpu_tensors_on_cpu_kernels(triton_device: torch.device) -> None:
    case = Case.parse("k4v4-plain-g16 h2x2 e3")
    cpu_inputs = case.inputs()
    inputs = on(cpu_inputs, triton_device, "triton")
    expected = attention_definition(case.query(), cpu_inputs, None, case.scaling)
    out = attend(case.query().to(triton_device), inputs, None, case.scaling).cpu()
    assert_close_to_definition(out, expected, case.tolerance(cpu_inputs))
    inputs.backend = "auto"
    assert (resolve_backend(inputs) == "triton") == ON_GPU  # CPU tensors never go to the interpreter by themselves


@pytest.mark.skipif(ON_GPU, reason="this machine has a GPU")
def test_asking_for_triton_without_a_gpu_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = Case.parse("k4v4-plain-g16 h1x1 p1 e2").inputs(backend="triton")
    with pytest.raises(BackendUnavailableError, match="'triton' cannot run here: no CUDA GPU"):
        attend(torch.randn(1, 1, 1, 64), inputs, None, 0.125)


@pytest.mark.parametrize("spec", ["k4v2-g16-r16-s2", "k4v2-g16-r16-s2-rot-cb"])
def test_fused_cache_generates_as_the_dense_path(triton_device: torch.device, spec: str) -> None:
    """End to end in a tiny model: decode steps of 1-3 tokens read the packed cache through the triton kernel
    (plain, and rotated with codebooks as the recommended configs are)."""
    model = tiny_llama().to(triton_device)
    ids = prompt(batch=2, tokens=56, seed=3).to(triton_device)
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(model, spec, backend="triton")
    fused = step_logits(model, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    assert all(layer.packed_length > 0 for layer in packed_layers(cache))


def test_kernels_compile_for_hopper() -> None:
    """The kernels go through Triton's compiler for sm_90 (no GPU needed): the interpreter never runs it."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.triton_compile"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = [line for line in result.stdout.splitlines() if '"kernel": "partials"' in line]
    assert len(kernels) == len(VARIANTS), result.stdout
