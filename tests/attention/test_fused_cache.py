"""The fused path inside transformers generation: kvpack's attention reads the packed cache directly.

The fused path must compute what the dense path computes (the same stored data, the same semantics: the stored
past, then the new tokens exactly), so the comparison here is between the two paths on one model and one cache
spec, and the only allowed difference is float32 arithmetic order (`FUSED_LOGIT_TOL`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, LlamaForCausalLM, PreTrainedModel

from kvpack import KVPackCache
from kvpack.attention import cpu, use_kvpack_attention
from kvpack.attention.registry import INPUTS_ATTRIBUTE
from kvpack.cache.layer import FUSED_MAX_NEW_TOKENS
from kvpack.compat import cache_kwargs
from kvpack.errors import BackendUnavailableError, ConfigError
from tests.cache.test_cache import gemma_config, generate, left_padded_batch, llama_config, prompt

# Logits of these tiny models span ~1; float32 reordering of sums over <= 100 tokens moves them by ~1e-6
# (measured <= 2e-6). 1e-4 leaves room and is still 30x below an 8-bit cache's own effect (>= 3e-3).
FUSED_LOGIT_TOL = 1e-4
BACKENDS = ["torch"] + ["cpu"] * (cpu.why_unavailable() is None) + ["numba"] * bool(importlib.util.find_spec("numba"))
SPECS = ["k8v8-g16-r16", "k4v2-g16-r0", "k3v3-g16-r16-s2", "k2v4-gk32-gv16-r16"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module", params=["llama", "gemma"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    torch.manual_seed(0)
    if request.param == "llama":
        return LlamaForCausalLM(llama_config()).eval()
    return Gemma3ForCausalLM(gemma_config()).eval()


def set_attention(model: PreTrainedModel, fused: bool) -> None:
    if fused:
        use_kvpack_attention(model)
    else:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def step_logits(model: PreTrainedModel, cache: Any, ids: torch.Tensor, prefill: int, fused: bool) -> torch.Tensor:
    set_attention(model, fused)
    logits = [model(ids[:, :prefill], **cache_kwargs(model, cache)).logits[:, -1]]
    for i in range(prefill, ids.shape[1], 3):  # chunks of 1-3 tokens: decode and candidate-verification shapes
        step = ids[:, i : i + 1 + (i // 3) % 3]
        logits.append(model(step, **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS)
def test_fused_steps_match_the_dense_path(model: PreTrainedModel, spec: str, backend: str) -> None:
    ids = prompt(batch=2, tokens=100, seed=3)
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(model, spec, backend=backend)
    fused = step_logits(model, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    assert all(layer.packed_length > 0 for layer in cache.layers if hasattr(layer, "packed_length"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["k4v4-g16-r16-s2-rot", "k2v3-g16-r0-rotk", "k8v4-g16-r16-rotv"])
def test_rotated_caches_match_the_dense_path(model: PreTrainedModel, spec: str, backend: str) -> None:
    ids = prompt(batch=2, tokens=70, seed=4)
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    fused = step_logits(model, KVPackCache(model, spec, backend=backend), ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_generates_as_the_dense_path(model: PreTrainedModel, backend: str) -> None:
    ids, mask = left_padded_batch()
    kwargs: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=25, return_dict_in_generate=True)
    set_attention(model, fused=False)
    dense = generate(model, KVPackCache(model, "k4v4-g16-r16"), ids, output_logits=True, **kwargs)
    set_attention(model, fused=True)
    fused = generate(model, KVPackCache(model, "k4v4-g16-r16", backend=backend), ids, output_logits=True, **kwargs)
    assert torch.equal(fused.sequences, dense.sequences)
    assert (torch.stack(fused.logits) - torch.stack(dense.logits)).abs().max().item() <= FUSED_LOGIT_TOL


def test_beam_search_and_prompt_lookup_run_fused(model: PreTrainedModel) -> None:
    ids = prompt(tokens=45, seed=5)
    for kwargs in ({"num_beams": 3}, {"prompt_lookup_num_tokens": 3}):
        set_attention(model, fused=False)
        dense = generate(model, KVPackCache(model, "k8v8-g16-r32"), ids, max_new_tokens=20, **kwargs)
        set_attention(model, fused=True)
        fused = generate(model, KVPackCache(model, "k8v8-g16-r32"), ids, max_new_tokens=20, **kwargs)
        assert torch.equal(fused, dense), kwargs


def test_other_caches_are_unaffected_by_kvpack_attention(model: PreTrainedModel) -> None:
    ids = prompt(tokens=30, seed=9)
    set_attention(model, fused=False)
    reference = generate(model, DynamicCache(config=model.config), ids, max_new_tokens=10)
    set_attention(model, fused=True)
    assert torch.equal(generate(model, DynamicCache(config=model.config), ids, max_new_tokens=10), reference)


def test_dense_path_returns_plain_tensors_and_fused_path_marks_them(model: PreTrainedModel) -> None:
    ids = prompt(tokens=60, seed=2)
    set_attention(model, fused=True)
    cache = KVPackCache(model, "k4v4-g16-r16")
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    layer = next(i for i, layer in enumerate(cache.layers) if not layer.is_sliding)
    new = torch.randn(1, 2, 1, cache.layers[layer].residual_keys.shape[-1])
    keys, _ = cache.update(new, new.clone(), layer)
    assert getattr(keys, INPUTS_ATTRIBUTE).total_tokens == 61
    assert not hasattr(new, INPUTS_ATTRIBUTE)  # the caller's tensor is left alone
    chunk = torch.randn(1, 2, FUSED_MAX_NEW_TOKENS + 1, new.shape[-1])
    keys, _ = cache.update(chunk, chunk.clone(), layer)  # a long chunk (a prefill) goes the dense way
    assert not hasattr(keys, INPUTS_ATTRIBUTE) and keys.shape[2] == 62 + FUSED_MAX_NEW_TOKENS
    set_attention(model, fused=False)
    keys, _ = cache.update(new, new.clone(), layer)
    assert not hasattr(keys, INPUTS_ATTRIBUTE) and keys.shape[2] == 63 + FUSED_MAX_NEW_TOKENS


def test_backend_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="auto, torch, cpu, numba, triton, dense"):
        KVPackCache(llama_config(), "k4v4", backend="cuda")


def test_explicit_cpu_backend_refuses_layouts_it_cannot_read(model: PreTrainedModel) -> None:
    if "cpu" not in BACKENDS:
        pytest.skip("needs numba")
    ids = prompt(tokens=60, seed=4)
    set_attention(model, fused=True)
    with pytest.raises(BackendUnavailableError, match="KIVI layout"), torch.no_grad():
        step_logits(model, KVPackCache(model, "k4v4-g16-r16-kt", backend="cpu"), ids, prefill=40, fused=True)
