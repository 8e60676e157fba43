"""`KVPackCache` inside transformers generation, on the tiny random-weight models of `tests.helpers.models` (a Llama,
and a Gemma 3 whose layers mix an 8-token sliding window with full attention). Group 16 and residual 0 / 16 / 32 make
packing start after a few dozen tokens, so every generation below runs on packed data.

Random-weight models have flat next-token distributions, so two top logits can be closer than an 8-bit cache's
error. Greedy comparisons therefore check logits against a tolerance (`tolerances.LOGIT_TOL_8BIT`), and require equal
tokens up to the first step where the full-precision top-2 margin is within twice that tolerance (a genuine near-tie,
where either token is a correct greedy choice for a cache this accurate): `tests.helpers.generation.assert_same_greedy`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DeepseekV3Config, DynamicCache, MistralConfig, PreTrainedModel, Qwen3NextConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpack import CacheConfig, ConfigError, KVPackCache, KVPackError, UnsupportedModelError, parse_spec
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer
from kvpack.compat import cache_kwargs, output_cache
from kvpack.config import DEFAULT_PRESET, PRESETS
from kvpack.errors import UnsupportedOperationError
from tests.helpers.generation import assert_same_greedy, generate, teacher_forced_logits
from tests.helpers.models import gemma_config, left_padded_batch, llama_config, prompt
from tests.helpers.states import packed_layers
from tests.quant.tolerances import LOGIT_TOL_8BIT

SPEC_8BIT = "k8v8-g16-r16"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def dynamic_fp16_nbytes(cache: DynamicCache) -> int:
    return sum((layer.keys.numel() + layer.values.numel()) * 2 for layer in cache.layers if layer.is_initialized)


# -- structure -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(llama_config(), id="llama"),
        pytest.param(gemma_config(), id="gemma3"),
        pytest.param(
            MistralConfig(
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=2,
                intermediate_size=128,
                vocab_size=128,
                head_dim=16,
                sliding_window=8,
            ),
            id="mistral-sliding-no-layer-types",
        ),
    ],
)
def test_layers_follow_the_models_layer_types(config: Any) -> None:
    cache = KVPackCache(config, "k4v4-plain-g16-r16")
    reference = DynamicCache(config=config)
    assert len(cache.layers) == len(reference.layers) == config.num_hidden_layers
    for idx, (layer, ref_layer) in enumerate(zip(cache.layers, reference.layers, strict=True)):
        assert layer.layer_idx == idx
        if isinstance(ref_layer, DynamicSlidingWindowLayer):
            assert type(layer) is PackedSlidingLayer
            assert layer.sliding_window == ref_layer.sliding_window
        else:
            assert type(layer) is PackedLayer
    assert cache.is_sliding == reference.is_sliding
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0 and cache.fp16_nbytes() == 0


def test_gemma_layers_are_sliding_then_full() -> None:
    cache = KVPackCache(gemma_config(), SPEC_8BIT)
    assert [type(layer) for layer in cache.layers] == [PackedSlidingLayer, PackedLayer]
    assert cache.layers[0].sliding_window == 8


def test_accepts_spec_strings_and_cache_configs() -> None:
    config = llama_config()
    from_string = KVPackCache(config, "k4v2-plain-g16-r32-s4")
    assert from_string.cache_config == parse_spec("k4v2-plain-g16-r32-s4")
    cache_config = CacheConfig(residual=16, sinks=2)
    from_config = KVPackCache(config, cache_config)
    assert from_config.cache_config is cache_config
    assert all(layer.config == cache_config for layer in packed_layers(from_config))
    # The default is the `balanced` preset, which is what the spec "k4v4" means.
    assert KVPackCache(config).cache_config == parse_spec("k4v4") == parse_spec(PRESETS[DEFAULT_PRESET])
    assert DEFAULT_PRESET == "balanced"
    assert "k4v2-plain-g16-r32-s4" in repr(from_string)
    # Sliding layers drop sinks (the window moves past them); full layers keep them.
    gemma_cache = KVPackCache(gemma_config(), "k4v4-plain-g16-r16-s4")
    assert [layer.config.sinks for layer in packed_layers(gemma_cache)] == [0, 4]


@pytest.mark.parametrize("bad", ["", "k5v4", "k4v4-plain-g24", "k4v4-plain-x3", "4bit"])
def test_bad_spec_raises_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        KVPackCache(llama_config(), bad)
    assert isinstance(info.value, KVPackError)


def test_bad_cache_config_type_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="spec string"):
        KVPackCache(llama_config(), 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "names"),
    [
        pytest.param(
            DeepseekV3Config(
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=4,
                num_hidden_layers=2,
                intermediate_size=128,
                vocab_size=128,
                kv_lora_rank=16,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                moe_intermediate_size=32,
                n_routed_experts=4,
                num_experts_per_tok=2,
                first_k_dense_replace=1,
            ),
            ["deepseek_v3", "latent"],
            id="deepseek_v3-latent-attention",
        ),
        pytest.param(llama_config(kv_lora_rank=16), ["llama", "latent"], id="kv_lora_rank-field"),
        pytest.param(
            Qwen3NextConfig(
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=4,
                intermediate_size=128,
                vocab_size=128,
            ),
            ["qwen3_next", "linear_attention"],
            id="qwen3_next-linear-attention",
        ),
    ],
)
def test_unsupported_architectures_raise_naming_them(config: Any, names: list[str]) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        KVPackCache(config, SPEC_8BIT)
    assert isinstance(info.value, KVPackError)
    for name in names:
        assert name in str(info.value)


# -- numerics inside the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["k8v8-g16-r0", "k8v8-g16-r16", "k8v8-g16-r32"])
def test_teacher_forced_logits_match_dynamic_cache(model: PreTrainedModel, spec: str) -> None:
    ids = prompt(batch=2, tokens=100, seed=2)
    reference = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=40)
    cache = KVPackCache(model.config, spec)
    got = teacher_forced_logits(model, cache, ids, prefill=40)
    assert all(layer.packed_length > 0 for layer in packed_layers(cache))
    err = (got - reference).abs().max().item()
    assert 0 < err <= LOGIT_TOL_8BIT


def test_logit_tolerance_separates_8_bit_from_2_bit(model: PreTrainedModel) -> None:
    ids = prompt(batch=2, tokens=100, seed=2)
    reference = teacher_forced_logits(model, DynamicCache(config=model.config), ids, prefill=40)
    got = teacher_forced_logits(model, KVPackCache(model.config, "k2v2-plain-g16-r0"), ids, prefill=40)
    assert (got - reference).abs().max().item() > 10 * LOGIT_TOL_8BIT


# -- generation --------------------------------------------------------------------------------------------------


def test_greedy_generation_matches_dynamic_cache(model: PreTrainedModel) -> None:
    ids = prompt(tokens=40, seed=3)
    kwargs: dict[str, Any] = dict(max_new_tokens=40, return_dict_in_generate=True, output_logits=True)
    reference = generate(model, DynamicCache(config=model.config), ids, **kwargs)
    cache = KVPackCache(model.config, SPEC_8BIT)
    packed = generate(model, cache, ids, **kwargs)
    assert_same_greedy(reference, packed, prompt_len=40)
    assert cache.get_seq_length() == output_cache(reference).get_seq_length() == 79
    assert all(layer.packed_length > 0 for layer in packed_layers(cache))


def test_nbytes_and_fp16_nbytes_are_sums_over_layers(model: PreTrainedModel) -> None:
    ids = prompt(batch=2, tokens=50, seed=4)
    reference = DynamicCache(config=model.config)
    generate(model, reference, ids, max_new_tokens=20)
    cache = KVPackCache(model.config, "k4v4-plain-g16-r16-s2")
    generate(model, cache, ids, max_new_tokens=20)
    layers = packed_layers(cache)
    assert cache.nbytes() == sum(layer.nbytes() for layer in layers) > 0
    assert cache.fp16_nbytes() == sum(layer.fp16_nbytes() for layer in layers)
    # What a float16 DynamicCache would hold: the same tokens (a sliding layer keeps only its window).
    assert cache.fp16_nbytes() == dynamic_fp16_nbytes(reference)


def test_beam_search_matches_dynamic_cache(model: PreTrainedModel) -> None:
    ids = prompt(tokens=40, seed=5)
    kwargs: dict[str, Any] = dict(max_new_tokens=20, num_beams=3, num_return_sequences=3)
    reference = generate(model, DynamicCache(config=model.config), ids, **kwargs)
    cache = KVPackCache(model.config, SPEC_8BIT)
    reorders = []
    original = cache.reorder_cache

    def spy(beam_idx: torch.LongTensor) -> None:
        reorders.append(all(layer.packed_length > 0 for layer in packed_layers(cache)))
        original(beam_idx)

    cache.reorder_cache = spy  # type: ignore[method-assign]
    packed = generate(model, cache, ids, **kwargs)
    assert reorders and all(reorders), "beam reordering must have run on packed data"
    # Fixed seeds; checked free of near-ties of beam scores at this tolerance (see module docstring).
    assert torch.equal(packed, reference)


def test_sampling_runs_and_matches_dynamic_cache_under_the_same_seed(model: PreTrainedModel) -> None:
    ids = prompt(batch=2, tokens=40, seed=6)
    kwargs: dict[str, Any] = dict(max_new_tokens=25, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(123)
    reference = generate(model, DynamicCache(config=model.config), ids, **kwargs)
    torch.manual_seed(123)
    packed = generate(model, KVPackCache(model.config, SPEC_8BIT), ids, **kwargs)
    assert packed.shape == reference.shape == (2, 65)
    # Sampling on CPU is deterministic for a seed, and a draw only changes where the uniform sample falls within
    # the probability moved by the cache's error (~1e-3 of a logit): with this seed none does.
    assert torch.equal(packed, reference)


def test_prompt_lookup_decoding_rolls_back_and_matches_greedy(model: PreTrainedModel) -> None:
    ids = torch.arange(2, 12).repeat(5)[None]  # repeated n-grams, so lookups propose candidates
    kwargs: dict[str, Any] = dict(max_new_tokens=30, return_dict_in_generate=True, output_logits=True)
    reference = generate(model, DynamicCache(config=model.config), ids, **kwargs)
    cache = KVPackCache(model.config, "k8v8-g16-r16")  # residual 16 >= prompt_lookup_num_tokens
    crops: list[int] = []
    original = cache.crop

    def spy(tokens_to_remove: int) -> None:
        crops.append(tokens_to_remove)
        original(tokens_to_remove)

    cache.crop = spy  # type: ignore[method-assign]
    packed = generate(model, cache, ids, prompt_lookup_num_tokens=3, **kwargs)
    assert any(n < 0 for n in crops), "rejected candidates must have been rolled back"
    assert_same_greedy(reference, packed, prompt_len=ids.shape[1])


def test_prompt_lookup_matches_prompt_lookup_with_dynamic_cache(model: PreTrainedModel) -> None:
    ids = torch.arange(2, 12).repeat(5)[None]
    kwargs: dict[str, Any] = dict(max_new_tokens=30, prompt_lookup_num_tokens=3)
    reference = generate(model, DynamicCache(config=model.config), ids, **kwargs)
    packed = generate(model, KVPackCache(model.config, "k8v8-g16-r16"), ids, **kwargs)
    assert torch.equal(packed, reference)


def test_batched_left_padded_generation_matches_dynamic_cache(model: PreTrainedModel) -> None:
    ids, mask = left_padded_batch()
    kwargs: dict[str, Any] = dict(
        attention_mask=mask, max_new_tokens=25, return_dict_in_generate=True, output_logits=True
    )
    reference = generate(model, DynamicCache(config=model.config), ids, **kwargs)
    cache = KVPackCache(model.config, SPEC_8BIT)
    packed = generate(model, cache, ids, **kwargs)
    assert_same_greedy(reference, packed, prompt_len=ids.shape[1])
    assert all(layer.packed_length > 0 for layer in packed_layers(cache))


def test_reset_then_reuse_with_another_batch(model: PreTrainedModel) -> None:
    cache = KVPackCache(model.config, SPEC_8BIT)
    generate(model, cache, prompt(tokens=45, seed=8), max_new_tokens=10)
    assert cache.get_seq_length() > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0 and cache.fp16_nbytes() == 0
    assert all(not layer.is_initialized for layer in packed_layers(cache))

    ids, mask = left_padded_batch()
    kwargs: dict[str, Any] = dict(
        attention_mask=mask, max_new_tokens=15, return_dict_in_generate=True, output_logits=True
    )
    reused = generate(model, cache, ids, **kwargs)
    fresh = generate(model, KVPackCache(model.config, SPEC_8BIT), ids, **kwargs)
    assert torch.equal(reused.sequences, fresh.sequences)
    for a, b in zip(reused.logits, fresh.logits, strict=True):
        assert torch.equal(a, b)


def test_cache_crop_into_packed_tokens_raises_and_keeps_the_cache(llama: PreTrainedModel) -> None:
    cache = KVPackCache(llama.config, SPEC_8BIT)
    generate(llama, cache, prompt(tokens=60, seed=9), max_new_tokens=5)
    length = cache.get_seq_length()
    with pytest.raises(UnsupportedOperationError):
        cache.crop(-40)
    assert cache.get_seq_length() == length
    cache.crop(-3)
    assert cache.get_seq_length() == length - 3


def test_cache_crop_refused_by_one_layer_leaves_every_layer_unchanged(gemma: PreTrainedModel) -> None:
    cache = KVPackCache(gemma.config, "k8v8-g16-r16-s4")
    with torch.no_grad():
        gemma(prompt(tokens=74, seed=9), **cache_kwargs(gemma, cache))
    # The sliding layer holds no sinks, so more of its tokens are in its residual window than in the full layer's.
    assert [layer.residual_len for layer in packed_layers(cache)] == [26, 22]
    with pytest.raises(UnsupportedOperationError):
        cache.crop(-24)
    assert [layer.get_seq_length() for layer in cache.layers] == [74, 74]


@pytest.mark.parametrize("spec", ["k4v4-s999999", "k4v4-r999999", "k4v4-plain-s257", "k8v8-r257"])
def test_sinks_or_a_window_beyond_the_models_context_are_refused(spec: str) -> None:
    """A window or sinks the model's context (256 tokens here) could never fill: refused with the limit, before
    anything is allocated (such a spec used to preallocate them in every layer: tens of GB for `-s999999`)."""
    with pytest.raises(ConfigError, match="at most 256 tokens") as info:
        KVPackCache(llama_config(), spec)
    assert "-r" in str(info.value) and "-s" in str(info.value)  # says what to write instead


def test_the_exact_window_grows_as_it_fills() -> None:
    """The longest window the context admits costs nothing until tokens arrive: a layer holds what it was given."""
    cache = KVPackCache(llama_config(), "k4v4-plain-g16-r256-s4")
    keys = torch.randn(1, 2, 10, 16)
    cache.update(keys, keys, 0)
    layer = cache.layers[0]
    assert isinstance(layer, PackedLayer)
    assert layer.exact_keys.shape[2] == 10
    assert layer.nbytes() == 2 * keys.numel() * keys.element_size()
    for _ in range(40):  # decode steps: the buffer at least doubles when it grows, so it rarely moves
        cache.update(keys[:, :, :1], keys[:, :, :1], 0)
    assert layer.exact_keys.shape[2] == 80 and layer.get_seq_length() == 50
