"""kvpress presses prune a prefill, kvpack packs the survivors (`kvpack.press`), and the layer protocol that allows it.

The invariants: the press sees the exact keys/values (nothing quantized before it prunes); what kvpack stores is
exactly what packing the press's survivors as a prefill stores; generation continues at the original positions;
kvpress's pipeline (its answer removal by slice assignment) works; any other assignment to a packed layer's keys
fails clearly instead of re-quantizing.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from transformers import DynamicCache

from kvpack import KVPackCache
from kvpack.cache.layer import PackedLayer
from kvpack.compat import cache_kwargs
from kvpack.config import parse_spec
from kvpack.errors import ConfigError, UnsupportedOperationError
from kvpack.press import PackAfterPress
from tests.helpers.models import default_model, prompt, tiny_gemma, tiny_llama

kvpress = pytest.importorskip("kvpress", reason="kvpress is installed by `bash scripts/setup.sh --dev` (--no-deps)")

SPEC = "k4v4-g16-r16-s2"


def _layer_state(layer: PackedLayer) -> dict[str, torch.Tensor]:
    return layer.state().tensors()


def _prefill(model, ids: torch.Tensor, cache, press=None) -> None:
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ids, **cache_kwargs(model, cache))


# -- the layer protocol --------------------------------------------------------------------------------------------


def test_a_held_prefill_is_returned_exactly_and_stored_as_a_prefill_of_what_is_released():
    config = parse_spec(SPEC)
    keys, values = torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    held = PackedLayer(config)
    held.hold_prefill()
    out_keys, out_values = held.update(keys, values)
    assert out_keys is keys and out_values is values  # nothing quantized before the press
    assert held.get_seq_length() == 90 and held.nbytes() == keys.nbytes + values.nbytes
    kept = torch.arange(0, 90, 2)
    held.release_prefill(keys[:, :, kept], values[:, :, kept])
    fresh = PackedLayer(config)
    fresh.update(keys[:, :, kept].clone(), values[:, :, kept].clone())
    assert held.get_seq_length() == fresh.get_seq_length() == 45
    for name, tensor in _layer_state(fresh).items():
        assert torch.equal(_layer_state(held)[name], tensor), name
    assert held.nbytes() == fresh.nbytes()


def test_a_second_update_while_holding_packs_the_held_prefill_first():
    config = parse_spec(SPEC)
    keys, values = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    held, plain = PackedLayer(config), PackedLayer(config)
    held.hold_prefill()
    held.update(keys[:, :, :60], values[:, :, :60])
    held.update(keys[:, :, 60:], values[:, :, 60:])
    plain.update(keys[:, :, :60], values[:, :, :60])
    plain.update(keys[:, :, 60:], values[:, :, 60:])
    assert not held.holding
    for name, tensor in _layer_state(plain).items():
        assert torch.equal(_layer_state(held)[name], tensor), name


def test_holding_needs_an_empty_layer():
    layer = PackedLayer(parse_spec(SPEC))
    layer.update(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(UnsupportedOperationError, match="empty layer"):
        layer.hold_prefill()


def test_layer_keys_read_the_dense_cache_and_a_prefix_slice_assignment_crops():
    layer = PackedLayer(parse_spec(SPEC))
    assert layer.keys is None and layer.values is None
    keys, values = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    layer.update(keys, values)
    dense_keys, dense_values = layer.dense()
    assert torch.equal(layer.keys, dense_keys) and torch.equal(layer.values, dense_values)
    layer.keys = layer.keys[:, :, :45]  # what kvpress's pipeline does to drop an answer
    layer.values = layer.values[:, :, :45]
    assert layer.get_seq_length() == 45
    assert torch.equal(layer.keys, dense_keys[:, :, :45]) and torch.equal(layer.values, dense_values[:, :, :45])


@pytest.mark.parametrize(
    "assigned",
    [
        lambda layer: torch.zeros(1, 2, 10, 16),  # new data: would be re-quantized
        lambda layer: layer.keys[:, :, 5:],  # not a prefix
        lambda layer: layer.keys.clone()[:, :, :10],  # a prefix of a copy, not of what was read
    ],
)
def test_any_other_assignment_to_a_packed_layers_keys_raises(assigned):
    layer = PackedLayer(parse_spec(SPEC))
    layer.update(torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
    with pytest.raises(UnsupportedOperationError, match="PackAfterPress"):
        layer.keys = assigned(layer)
    assert layer.get_seq_length() == 50


def test_a_crop_into_packed_tokens_raises():
    layer = PackedLayer(parse_spec(SPEC))
    layer.update(torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16))
    with pytest.raises(UnsupportedOperationError, match="quantized"):
        layer.keys = layer.keys[:, :, :10]


# -- the wrapper ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("press_name", ["KnormPress", "SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress"])
def test_prune_then_pack_equals_packing_what_the_press_keeps_from_exact_keys(press_name):
    model = tiny_llama()
    ids = prompt(tokens=120)
    make = getattr(kvpress, press_name)
    kwargs = {"window_size": 8} if press_name == "SnapKVPress" else {}
    reference = DynamicCache()
    _prefill(model, ids, reference, PackAfterPress(make(compression_ratio=0.5, **kwargs)))
    cache = KVPackCache(model, SPEC)
    _prefill(model, ids, cache, PackAfterPress(make(compression_ratio=0.5, **kwargs)))
    assert cache.get_seq_length() == reference.get_seq_length() == 60
    for idx, layer in enumerate(cache.layers):
        packed = PackedLayer(layer.config, idx)
        packed.update(reference.layers[idx].keys, reference.layers[idx].values)
        for name, tensor in _layer_state(packed).items():
            assert torch.equal(_layer_state(layer)[name], tensor), (idx, name)


def test_a_scorer_press_keeps_its_own_tokens_in_position_order():
    # kvpress keeps a scorer press's best tokens in score order; kvpack's sinks are the first stored tokens and its
    # residual window the newest, so the same tokens are kept in position order (attention does not depend on it).
    press = kvpress.KnormPress(compression_ratio=0.5)
    keys, values = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    module = torch.nn.Module()
    module.head_dim = 16
    theirs_keys, _ = press.compress(module, torch.zeros(1, 40, 8), keys, values, None, {})
    ours_keys, ours_values = PackAfterPress(press).prune(module, torch.zeros(1, 40, 8), keys, values, None, {})
    kept = (-keys.norm(dim=-1)).topk(20, dim=-1).indices.sort(dim=-1).values  # Knorm keeps the smallest norms
    assert torch.equal(ours_keys, keys.gather(2, kept[..., None].expand(-1, -1, -1, 16)))
    assert torch.equal(ours_values, values.gather(2, kept[..., None].expand(-1, -1, -1, 16)))
    order = theirs_keys.norm(dim=-1).argsort(dim=-1)[..., None].expand(-1, -1, -1, 16)
    assert torch.equal(theirs_keys.gather(2, order), ours_keys.gather(2, ours_keys.norm(dim=-1).argsort(dim=-1)[
        ..., None].expand(-1, -1, -1, 16)))  # fmt: skip
    assert not torch.equal(theirs_keys, ours_keys)  # (theirs are in score order)


def test_sliding_window_layers_are_not_pruned():
    model = tiny_gemma()
    cache = KVPackCache(model, SPEC)
    _prefill(model, prompt(tokens=100), cache, PackAfterPress(kvpress.KnormPress(compression_ratio=0.5)))
    sliding, full = cache.layers
    assert sliding.is_sliding and not full.is_sliding
    assert full.get_seq_length() == 50 and sliding.get_seq_length() == 100


def test_generation_after_a_pruned_prefill_continues_at_the_original_positions():
    model = tiny_llama()
    ids = prompt(tokens=100)
    positions: list[torch.Tensor] = []

    def record(module, args, kwargs):
        positions.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

    hook = model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    press = PackAfterPress(kvpress.KnormPress(compression_ratio=0.5))
    try:
        outputs = {}
        for name, cache in (("fp", DynamicCache()), ("k8v8", KVPackCache(model, "k8v8-g16-r16"))):
            positions.clear()
            with press(model), torch.no_grad():
                out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
            outputs[name] = out[0, 100:]
            assert cache.get_seq_length() == 50 + 5
            assert [p.flatten().tolist() for p in positions[1:]] == [[100 + i] for i in range(5)]
    finally:
        hook.remove()
    assert torch.equal(outputs["fp"], outputs["k8v8"])


def test_refused_presses_and_non_presses_raise_config_error():
    with pytest.raises(ConfigError, match="prunes at prefill"):
        PackAfterPress(kvpress.DecodingPress(base_press=kvpress.KnormPress(compression_ratio=0.5)))
    with pytest.raises(ConfigError, match="wraps a kvpress press"):
        PackAfterPress(object())


def test_without_kvpress_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps kvpress=="):
        PackAfterPress(object())


# -- kvpress's pipeline on the default model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model_and_tokenizer():
    return default_model(torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")  # kvpress's own calls
def test_kvpress_pipeline_with_a_packed_cache_answers_as_with_transformers_cache(default_model_and_tokenizer):
    from transformers import pipeline

    model, tokenizer = default_model_and_tokenizer
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    context = "The lighthouse was built in 1871. Its light was converted to electricity in 1957. " * 20
    questions = ["When was the lighthouse built?", "When was the light converted to electricity?"]
    press = PackAfterPress(kvpress.SnapKVPress(compression_ratio=0.5))
    caches = {"fp": DynamicCache, "k8v8": lambda: KVPackCache(model, "k8v8")}
    answers = {}
    for name, make_cache in caches.items():
        cache = make_cache()
        answers[name] = pipe(context, questions=questions, press=press, cache=cache, max_new_tokens=12)["answers"]
        assert cache.get_seq_length() < len(tokenizer(context)["input_ids"])  # pruned, answers dropped
        # The first answer was dropped from the cache exactly: the second question gets what it gets alone.
        alone = pipe(context, question=questions[1], press=press, cache=make_cache(), max_new_tokens=12)
        assert alone["answer"] == answers[name][1]
    assert answers["fp"] == answers["k8v8"]
