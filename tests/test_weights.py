"""Quantized weights (kvpack.weights): format checks, byte counts, and the error when optimum-quanto is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpack.errors import ConfigError, KVPackError
from kvpack.weights import check_weights, quantize_weights, weight_nbytes


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=256, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _linear_numel(model: torch.nn.Module) -> int:
    return sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    )


def test_unknown_weight_format_is_a_clear_error() -> None:
    check_weights("fp")
    for bad in ("", "int3", "fp16"):
        with pytest.raises(ConfigError, match="fp, int8, int4"):
            check_weights(bad)


def test_weight_bytes_count_tied_tensors_once() -> None:
    model = _tiny_model()
    unique = {id(p): p for p in model.parameters()}  # the tied head is the embedding
    expected = sum(p.numel() * p.element_size() for p in unique.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # Llama keeps no persistent buffers
    assert weight_nbytes(model) == expected
    assert quantize_weights(model, "fp") is model and weight_nbytes(model) == expected


def test_missing_quanto_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    check_weights("fp")  # needs nothing
    with pytest.raises(KVPackError, match="optimum-quanto"):
        check_weights("int4")


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="needs optimum-quanto")
@pytest.mark.parametrize(("weights", "bytes_per_weight"), [("int8", 1.0), ("int4", 0.5)])
def test_quantized_weights_shrink_and_stay_close(weights: str, bytes_per_weight: float) -> None:
    model = _tiny_model()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    before, linear = weight_nbytes(model), _linear_numel(model)
    quantize_weights(model, weights)
    saved = before - weight_nbytes(model)
    # Each linear weight goes from 4 bytes to `bytes_per_weight`, plus scales (and zero points) per group.
    assert 0.9 * (4 - bytes_per_weight) * linear < saved < (4 - bytes_per_weight) * linear
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    relative = (logits - reference).norm() / reference.norm()
    assert 0 < relative < (0.02 if weights == "int8" else 0.2)
