"""Shared fixtures: the device under test, the embedded default model (loaded once per session), and a tiny
random-weight Llama saved locally with the default model's tokenizer (for CLI and benchmark tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, the triton backend's tests (tests/attention/test_triton.py) run its kernels under Triton's
# interpreter. Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, and its own library
# functions (tl.zeros, tl.sum, ...) are decorated when triton is first imported, which happens early and not by
# kvpack: transformers imports hqq, whose `torch.compile` imports torch._dynamo, which imports triton wherever it
# is installed. So the variable is set here, before pytest imports any test module (a test module or fixture
# would be too late in a full run). It changes nothing else: only kvpack's triton backend runs Triton kernels,
# and `auto` never picks it for CPU tensors. With a GPU it stays unset and the kernels are compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model tests: they run fastest that way, and on a busy 2-core machine a
    second thread that is not scheduled makes every op wait (measured 5 s instead of 0.3 s for one batched
    generate). Use with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


@pytest.fixture(scope="session")
def default_model(device: torch.device):
    """(model, tokenizer) of the embedded default model, float32, on the test device."""
    from kvpack.models import load_model

    torch.manual_seed(0)
    return load_model(None, dtype="float32", device=device, verbose=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (2 layers, 2 kv heads, head_dim 16) saved with the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvpack.models import default_model_file

    gguf = default_model_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=len(tokenizer), head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
