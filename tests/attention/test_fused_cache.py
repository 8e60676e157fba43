"""The fused path inside transformers generation: kvpack's attention reads the packed cache directly.

The fused path must compute what the dense path computes (the same stored data, the same semantics: the stored
past, then the new tokens exactly), so the comparison here is between the two paths on one model and one cache
spec, over every storage option (bits, groups, sinks, rotation, codebooks, clipping, outliers), and the only allowed
difference is float32 arithmetic order (`tolerances.FUSED_LOGIT_TOL`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel

from kvpack import KVPackCache
from kvpack.attention.inputs import INPUTS_ATTRIBUTE
from kvpack.cache.layer import FUSED_MAX_NEW_TOKENS
from kvpack.compat import cache_kwargs
from kvpack.errors import BackendUnavailableError, ConfigError
from tests.helpers.backends import CPU_KERNELS, backend_params
from tests.helpers.generation import generate, set_attention, step_logits
from tests.helpers.models import left_padded_batch, llama_config, prompt
from tests.helpers.states import packed_layers
from tests.quant.tolerances import FUSED_LOGIT_TOL

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPECS = [
    "k8v8-g16-r16", "k4v2-g16-r0", "k3v3-g16-r16-s2", "k2v4-gk32-gv16-r16",
    "k4v4-g16-r16-s2-rot", "k2v3-g16-r0-rotk", "k8v4-g16-r16-rotv",
    "k4v2-g16-r16-cb-clip", "k2v4-g16-r0-s2-rot-cb-clip", "k8v3-g16-r16-cbv-clipk",
]  # fmt: skip
# Outlier entries: the fused kernels refuse them (tests/attention/test_backends.py), `auto` reads them with torch.
OUTLIER_SPECS = ["k2v2-g16-r16-o1", "k3v4-g16-r0-s2-ok2-ov1", "k2v3-g16-r16-rot-o2"]


def assert_fused_matches_dense(model: PreTrainedModel, spec: str, backend: str, ids: torch.Tensor) -> None:
    """Decode steps read through `backend` give the dense path's logits, on packed data in every layer."""
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(model, spec, backend=backend)
    fused = step_logits(model, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    assert all(layer.packed_length > 0 for layer in packed_layers(cache))


@pytest.mark.parametrize("backend", backend_params(*CPU_KERNELS))
@pytest.mark.parametrize("spec", SPECS)
def test_fused_steps_match_the_dense_path(model: PreTrainedModel, spec: str, backend: str) -> None:
    assert_fused_matches_dense(model, spec, backend, prompt(batch=2, tokens=100, seed=3))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("spec", OUTLIER_SPECS)
def test_fused_steps_with_outliers_match_the_dense_path(llama: PreTrainedModel, spec: str, backend: str) -> None:
    assert_fused_matches_dense(llama, spec, backend, prompt(batch=2, tokens=90, seed=3))


@pytest.mark.parametrize(
    ("spec", "without"),
    [
        ("k2v2-g16-r16-o1", "k2v2-g16-r16"),
        ("k3v4-g16-r0-s2-ok2-ov1", "k3v4-g16-r0-s2"),
        ("k2v3-g16-r16-rot-o2", "k2v3-g16-r16-rot"),
        ("k2v2-g16-r0-cb", "k2v2-g16-r0"),
    ],
)
def test_the_option_reaches_what_attention_reads(llama: PreTrainedModel, spec: str, without: str) -> None:
    """Outliers and codebooks change the stored data (not silently ignored): other logits, beyond the fused
    tolerance, than the same spec without them."""
    ids = prompt(batch=2, tokens=90, seed=3)
    with_option = step_logits(llama, KVPackCache(llama, spec), ids, prefill=37, fused=False)
    without_option = step_logits(llama, KVPackCache(llama, without), ids, prefill=37, fused=False)
    assert (with_option - without_option).abs().max().item() > FUSED_LOGIT_TOL


@pytest.mark.parametrize("backend", backend_params(*CPU_KERNELS))
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


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_explicit_cpu_backend_refuses_layouts_it_cannot_read(model: PreTrainedModel, backend: str) -> None:
    ids = prompt(tokens=60, seed=4)
    set_attention(model, fused=True)
    with pytest.raises(BackendUnavailableError, match="KIVI layout"), torch.no_grad():
        step_logits(model, KVPackCache(model, "k4v4-g16-r16-kt", backend=backend), ids, prefill=40, fused=True)
