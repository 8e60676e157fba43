"""Caches under test (kvpack, fp, peers): parsing, construction, byte counting (peers included)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from kvpack import ConfigError, KVPackCache, KVPackError
from kvpack.compat import cache_kwargs
from kvpack.harness import caches
from kvpack.harness.caches import cache_nbytes, make_cache, parse_cache_name


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, head_dim=16,
    )  # fmt: skip


def test_names_parse_to_kinds_and_peer_options() -> None:
    assert parse_cache_name("fp").kind == "fp"
    assert parse_cache_name("k4v4-plain").name == "k4v4-plain-g64-r128"
    quanto = parse_cache_name("quanto-int2-g32-r0")
    assert quanto.kind == "peer"
    assert quanto.peer == {
        "backend": "quanto", "nbits": 2, "q_group_size": 32, "residual_length": 0, "axis_key": 0, "axis_value": 0,
    }  # fmt: skip
    hqq = parse_cache_name("hqq-int4-axis1")
    assert hqq.peer["axis_key"] == hqq.peer["axis_value"] == 1
    assert hqq.feed_first_tokens_together == 2 and hqq.notes  # the workaround is stated in the results
    assert quanto.feed_first_tokens_together == 1 and not quanto.notes
    tqai = parse_cache_name("tqai-k4v2-r128-s4")
    assert tqai.kind == "peer" and tqai.name == "tqai-k4v2-r128-s4"
    assert tqai.peer == {"backend": "tqai", "bits_k": 4, "bits_v": 2, "residual_length": 128, "sink_tokens": 4}
    assert parse_cache_name("tqai-k4v4").peer == {
        "backend": "tqai", "bits_k": 4, "bits_v": 4, "residual_length": 0, "sink_tokens": 0,
    }  # fmt: skip
    assert any("dequantized copy" in note for note in tqai.notes)
    assert tqai.bits_per_value(64) == 3.25 and tqai.bits_per_value() is None  # codes + a float16 norm per vector


@pytest.mark.parametrize("bad", ["quanto", "hqq-int4-axis2", "k5v4", "fp16x", "", "tqai-k4", "tqai-k4v4-g32"])
def test_unknown_names_list_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ConfigError, match="quanto-int4"):
        parse_cache_name(bad)


def test_missing_peer_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(caches.importlib.util, "find_spec", lambda name: None if "quanto" in name else real(name))
    with pytest.raises(KVPackError, match="pip install 'optimum-quanto'"):
        make_cache(parse_cache_name("quanto-int4"), tiny_config())


def test_missing_tqai_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(caches.importlib.util, "find_spec", lambda name: None if "tqai" in name else real(name))
    with pytest.raises(KVPackError, match="pip install 'tqai'"):
        make_cache(parse_cache_name("tqai-k4v4"), tiny_config())


@pytest.mark.skipif(importlib.util.find_spec("tqai") is None, reason="tqai is not installed")
@pytest.mark.parametrize("name", ["tqai-k8v8", "tqai-k4v4-r16-s2"])
def test_tqai_peer_streams_and_its_bytes_are_counted(name: str) -> None:
    """tqai (TurboQuant) returns every token dequantized: close to the input at 8 bits, exact in its residual window
    and sinks; it holds float buffers of every token (more bytes than DynamicCache), which `cache_nbytes` finds.
    The update takes transformers 5.25's keyword arguments (tqai 0.6's own does not)."""
    config = tiny_config()
    config.head_dim = 64  # tqai ships levels for head dims 64, 96, 128, 256 (others need scipy to fit them)
    cache, fp = make_cache(parse_cache_name(name), config), DynamicCache(config=config)
    _fill(cache, config, 100)
    _fill(fp, config, 100)
    keys, _ = cache.update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64), 0, None, kwargs={})
    exact = fp.layers[0].keys
    assert keys.shape == (1, 2, 101, 64) and cache.get_seq_length(0) == 101
    error = (keys[:, :, :100] - exact).norm() / exact.norm()
    assert error < (0.02 if name == "tqai-k8v8" else 0.2), float(error)
    if name.endswith("-r16-s2"):
        assert torch.equal(keys[:, :, :2], exact[:, :, :2]) and torch.equal(keys[:, :, 85:100], exact[:, :, 85:])
    assert cache_nbytes(cache) > cache_nbytes(fp)


def test_make_cache_builds_each_kind() -> None:
    config = tiny_config()
    assert isinstance(make_cache(parse_cache_name("fp"), config), DynamicCache)
    assert isinstance(make_cache(parse_cache_name("k8v8-g16-r16"), config), KVPackCache)


def _fill(cache, config: LlamaConfig, tokens: int, first: int = 1) -> None:
    generator = torch.Generator().manual_seed(0)
    for layer_idx in range(config.num_hidden_layers):
        shape = (1, config.num_key_value_heads, tokens, config.head_dim)
        keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        cache.update(keys[:, :, :first], values[:, :, :first], layer_idx)
        cache.update(keys[:, :, first:], values[:, :, first:], layer_idx)


def test_cache_nbytes_of_dynamic_cache_is_its_keys_and_values() -> None:
    config = tiny_config()
    cache = DynamicCache(config=config)
    _fill(cache, config, 100)
    expected = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache_nbytes(cache) == expected == 2 * 2 * 100 * 2 * 16 * 4


def test_cache_nbytes_counts_shared_storage_once() -> None:
    from types import SimpleNamespace

    keys, empty = torch.zeros(1, 2, 10, 16), torch.zeros(0)
    # A view of the same storage, and a container holding it again: counted once; an empty tensor adds nothing.
    layer = SimpleNamespace(keys=keys, values=keys[:, :, :4], extra=[keys, {"again": keys}], empty=empty)
    assert cache_nbytes(SimpleNamespace(layers=[layer, layer])) == keys.nbytes == 1280


def test_cache_nbytes_of_kvpack_is_its_exact_count() -> None:
    config = tiny_config()
    cache = KVPackCache(config, "k4v4-plain-g16-r16")
    _fill(cache, config, 100)
    assert cache_nbytes(cache) == cache.nbytes() > 0


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-quanto is not installed")
def test_cache_nbytes_of_quanto_counts_codes_scales_shifts_and_residual() -> None:
    config = tiny_config()
    cache = make_cache(parse_cache_name("quanto-int4-g16-r16"), config)
    _fill(cache, config, 100)
    # 2 layers x (keys + values) of [1, 2, 100, 16] quantized at once by the prefill: 3200 values each, 4-bit
    # codes (1600 bytes), one float32 scale and shift per group of 16 (200 groups, 800 + 800 bytes); the
    # residual is empty right after a flush.
    per_tensor = 1600 + 800 + 800
    assert cache_nbytes(cache) == 2 * 2 * per_tensor


def test_preallocated_fp_cache_generates_as_dynamic_cache() -> None:
    from transformers import LlamaForCausalLM

    from kvpack.harness.caches import PreallocatedCache

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=128, head_dim=16,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(2, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 80, "do_sample": False, "pad_token_id": 0}  # past 256 tokens: the buffer grows
    reference = model.generate(ids, **cache_kwargs(model, DynamicCache(config=config)), **kwargs)
    cache = make_cache(parse_cache_name("fp-prealloc"), config)
    assert isinstance(cache, PreallocatedCache)
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kwargs), reference)
    assert cache.get_seq_length() == 279 and cache.layers[0].key_buffer.shape[2] == 512  # 256, then doubled


@pytest.mark.skipif(importlib.util.find_spec("tqai") is None, reason="tqai is not installed")
def test_the_tqai_peer_keeps_a_sliding_window_models_windows() -> None:
    """tqai's cache keeps its tokens outside transformers' cache layers, so transformers sized every attention mask as
    if the cache were empty and a sliding-window layer saw every token: the harness's tqai cache says its sizes."""
    from transformers import Gemma3ForCausalLM

    from tests.helpers.models import gemma_config, prompt

    config = gemma_config()  # a sliding-window layer of 8 tokens, then a full-attention one
    config.head_dim = 64  # (tqai ships levels for head dims 64, 96, 128, 256)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    ids = prompt(tokens=24)
    last = {}
    caches_ = {"fp": DynamicCache(config=config), "tqai": make_cache(parse_cache_name("tqai-k8v8"), config)}
    for name, cache in caches_.items():
        with torch.no_grad():
            for token in range(ids.shape[1]):
                out = model(ids[:, token : token + 1], **cache_kwargs(model, cache), use_cache=True)
        last[name] = out.logits[0, -1].log_softmax(-1)
    kl = torch.sum(last["fp"].exp() * (last["fp"] - last["tqai"]))
    assert kl < 1e-3, float(kl)  # 8-bit codes: close to the fp cache once the window has slid 16 tokens
