"""Shared fixtures: the device under test, the tiny random-weight models (one instance per test module), the embedded
default model (loaded once per session), and a tiny Llama saved with the default model's tokenizer (for CLI and
benchmark tests). What they build comes from `tests.helpers`, the only package a conftest imports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Without a GPU, the triton backend's tests run its kernels under Triton's interpreter. Triton reads TRITON_INTERPRET
# when `@triton.jit` decorates a function, and its own library functions (tl.zeros, tl.sum, ...) are decorated when
# triton is first imported, which happens early and not by kvpack: transformers imports hqq, whose `torch.compile`
# imports torch._dynamo, which imports triton wherever it is installed. So the variable is set here, before pytest
# imports any test module (a test module or fixture would be too late in a full run). It changes nothing else: only
# kvpack's triton backend runs Triton kernels, and `auto` never picks it for CPU tensors. With a GPU it stays unset
# and the kernels are compiled. (For the same reason the fixtures below import transformers, through
# `tests.helpers.models`, only when they run.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _float_attention(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kernel in floating point (`kvpack.attention.cpu.integer_products` off) for every test not marked
    `integer_products`: the others compare float arithmetic at float tolerances, and the integer path's rounding is
    tested against its own bound (tests/attention/test_integer_products.py). Subprocesses inherit it through
    KVPACK_INTEGER_PRODUCTS."""
    on = request.node.get_closest_marker("integer_products") is not None
    monkeypatch.setenv("KVPACK_INTEGER_PRODUCTS", "1" if on else "0")
    monkeypatch.setattr("kvpack.attention.cpu.integer_products", on)


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model tests (its module-scoped fixtures included): they run fastest that
    way, and on a busy 2-core machine a second thread that is not scheduled makes every op wait (measured 5 s instead
    of 0.3 s for one batched generate). Use with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread_again(request: pytest.FixtureRequest) -> None:
    """Before each test of such a module, one thread again, whatever an earlier test set (a test that measures
    threads sets its own)."""
    if "one_intra_op_thread" in request.fixturenames:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device tests run on: CUDA when present (or KVPACK_TEST_DEVICE), else CPU."""
    name = os.environ.get("KVPACK_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """Where the triton backend's tests run its kernels: CUDA when there is a GPU; else CPU, with the kernels
    interpreted (TRITON_INTERPRET, set above). Skips without triton."""
    triton = pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    from kvpack.attention import triton_gpu

    if not triton_gpu.interpreting():
        pytest.skip("no GPU, and TRITON_INTERPRET is set to false")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.zeros, InterpretedFunction):
        pytest.fail("triton was imported before tests/conftest.py set TRITON_INTERPRET=1: its kernels would not run")
    return torch.device("cpu")


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    """The tiny random-weight Llama of `tests.helpers.models`, one per test module."""
    from tests.helpers import models

    return models.tiny_llama()


@pytest.fixture(scope="module")
def gemma() -> PreTrainedModel:
    """The tiny random-weight Gemma 3 (a sliding-window layer, then a full one), one per test module."""
    from tests.helpers import models

    return models.tiny_gemma()


@pytest.fixture(params=["llama", "gemma"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """Each tiny model in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def default_model(device: torch.device) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) of the embedded default model, float32, on the test device."""
    from tests.helpers import models

    return models.default_model(device)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (2 layers, 2 kv heads, head_dim 16) saved with the default model's tokenizer."""
    from tests.helpers import models

    return models.save_tiny_llama_with_default_tokenizer(tmp_path_factory.mktemp("tiny"))
