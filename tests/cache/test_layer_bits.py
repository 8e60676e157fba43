"""Per-layer bit widths (`CacheConfig.layer_bits`, spec option `-l`): the spec, each layer's config, the cache built
from them (Llama and a Gemma 3 mixing sliding and full layers), fused vs dense, bytes, and prompt-cache files."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from kvpack import CacheConfig, ConfigError, KVPackCache, parse_spec, prefix_cache
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer
from kvpack.cache.persist import read_cache_file
from tests.helpers.backends import CPU_KERNELS, backend_params
from tests.helpers.generation import continue_steps, step_logits
from tests.helpers.models import prompt
from tests.helpers.states import assert_same_states
from tests.quant.tolerances import FUSED_LOGIT_TOL

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PER_LAYER = "k4v4-g16-r16-s2-rot-l2483"  # layer 0: 2-bit keys, 4-bit values; layer 1: 8-bit keys, 3-bit values


def test_spec_round_trips_with_per_layer_bits() -> None:
    config = parse_spec(PER_LAYER)
    assert config.layer_bits == ((2, 4), (8, 3))
    assert config.spec == PER_LAYER and parse_spec(config.spec) == config
    assert CacheConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    uniform = parse_spec("k4v4-plain-g16-r16-s2-rot")
    assert uniform.layer_bits == () and "-l" not in uniform.spec
    # A uniform config's dict has no layer_bits (the layout before per-layer bits), and reads back.
    assert "layer_bits" not in uniform.to_dict() and CacheConfig.from_dict(uniform.to_dict()) == uniform


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("k4v4-plain-l248", "two digits per layer"),
        ("k4v4-plain-l25", r"bits must be among \(2, 3, 4, 8\)"),
        ("k4v4-plain-lx4", "unknown option"),
    ],
)
def test_bad_per_layer_bits_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_for_layer_replaces_only_the_bits() -> None:
    config = parse_spec(PER_LAYER)
    layer1 = config.for_layer(1)
    assert layer1.layer_bits == () and (layer1.key.bits, layer1.value.bits) == (8, 3)
    assert replace(layer1.key, bits=4) == config.key and replace(layer1.value, bits=4) == config.value
    assert (layer1.residual, layer1.sinks, layer1.block_tokens) == (config.residual, config.sinks, config.block_tokens)
    assert parse_spec("k3v2-plain").for_layer(7) == parse_spec("k3v2-plain")  # uniform: every layer the same
    with pytest.raises(ConfigError, match="layer 2 is outside the 2 layers"):
        config.for_layer(2)


def test_average_bits_count_metadata_and_weight_by_head_dims() -> None:
    config = parse_spec(PER_LAYER)  # group 16: 2 metadata bits per value
    assert config.bits_per_value == (2 + 4 + 8 + 3) / 4 + 2
    # Keys of head dim 3 and values of head dim 1: keys count three times as much.
    assert config.average_bits(key_dim=3, value_dim=1) == ((2 * 3 + 4) + (8 * 3 + 3)) / 8 + 2
    assert parse_spec("k4v2-plain-gk32-gv16").bits_per_value == ((4 + 1) + (2 + 2)) / 2


def test_cache_builds_each_layer_from_its_config(model: PreTrainedModel) -> None:
    cache = KVPackCache(model.config, PER_LAYER)
    config = parse_spec(PER_LAYER)
    for idx, layer in enumerate(cache.layers):
        assert isinstance(layer, PackedLayer)
        expected = config.for_layer(idx)
        if isinstance(layer, PackedSlidingLayer):
            expected = replace(expected, sinks=0)
        assert layer.config == expected


def test_a_layer_count_mismatch_names_both_numbers(llama: PreTrainedModel) -> None:
    with pytest.raises(ConfigError, match="per-layer bits for 3 layers, but this model has 2 layers"):
        KVPackCache(llama.config, "k4v4-plain-l444444")


def test_each_layer_holds_the_bytes_of_its_own_uniform_config(model: PreTrainedModel) -> None:
    """The per-layer cache's bytes are, layer by layer, those of a uniform cache with that layer's bits."""
    ids = prompt(batch=2, tokens=90, seed=3)
    mixed = prefix_cache(model, ids, PER_LAYER)
    config = parse_spec(PER_LAYER)
    total = 0
    for idx, layer in enumerate(mixed.layers):
        uniform = prefix_cache(model, ids, config.for_layer(idx))
        assert layer.packed_length > 0
        assert layer.nbytes() == uniform.layers[idx].nbytes()
        assert torch.equal(layer.packed_keys.view().codes, uniform.layers[idx].packed_keys.view().codes)
        total += uniform.layers[idx].nbytes()
    assert mixed.nbytes() == total


@pytest.mark.parametrize("backend", backend_params(*CPU_KERNELS))
@pytest.mark.parametrize("spec", [PER_LAYER, "k4v4-g16-r16-l3228"])
def test_fused_path_matches_dense_path_with_per_layer_bits(model: PreTrainedModel, spec: str, backend: str) -> None:
    """Each layer's packed views carry their own specs, so every kernel reads each layer at its own bits."""
    model = copy.deepcopy(model)  # step_logits switches the attention implementation
    ids = prompt(batch=2, tokens=100, seed=3)
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(model, spec, backend=backend)
    fused = step_logits(model, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    bits = {(layer.packed_keys.view().spec.bits, layer.packed_values.view().spec.bits) for layer in cache.layers}
    assert bits == set(parse_spec(spec).layer_bits)


def test_prompt_cache_file_round_trips_per_layer_bits(model: PreTrainedModel, tmp_path: Path) -> None:
    ids = prompt(batch=2, tokens=77, seed=4)
    original = prefix_cache(model, ids, PER_LAYER)
    original.save(tmp_path / "c.kvpc", model)
    assert read_cache_file(tmp_path / "c.kvpc").header.cache_config == parse_spec(PER_LAYER)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", model)
    assert loaded.cache_config == original.cache_config
    assert_same_states(original, loaded)
    more = prompt(batch=2, tokens=40, seed=5)
    for a, b in zip(continue_steps(model, original, more), continue_steps(model, loaded, more), strict=True):
        assert torch.equal(a, b)
