"""Tiny random-weight models shared by the cache tests (one instance per test module)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, PreTrainedModel

from tests.cache.test_cache import gemma_config, llama_config


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.fixture(scope="module")
def gemma() -> PreTrainedModel:
    torch.manual_seed(0)
    return Gemma3ForCausalLM(gemma_config()).eval()


@pytest.fixture(params=["llama", "gemma"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return request.getfixturevalue(request.param)
