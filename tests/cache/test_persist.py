"""Prompt caches on disk (`kvpack.cache.persist`): bit-exact round trips, refusals with the check that failed, and a
fuzz of the reader.

Exactness is checked without tolerances: a loaded cache holds every tensor of the saved one bit for bit, and the
model continues from it with bit-identical logits and greedy tokens to a cache that ran the same prefill itself
(same config, same process, same CPU kernels). Tiny random-weight models (a Llama, and a Gemma 3 whose layers mix
an 8-token sliding window with full attention) cover every layer state; the real model checks generation from a
prefix of a real document at k8v8 and k4v4.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel

from kvpack import (
    CacheChecksumError,
    CacheFileError,
    CacheFormatError,
    CacheModelMismatchError,
    CacheVersionError,
    KVPackCache,
    KVPackError,
    prefix_cache,
    use_kvpack_attention,
)
from kvpack.cache.layer import PackedLayer
from kvpack.cache.persist import (
    MAX_HEADER_BYTES,
    CacheFileHeader,
    content_sha256,
    layer_devices,
    read_cache_file,
)
from kvpack.compat import cache_kwargs
from tests.helpers.generation import continue_steps
from tests.helpers.models import default_tokenizer, gemma_config, llama_config, prompt
from tests.helpers.states import assert_same_states

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Every layer state: sinks, no residual, 2/3/4/8 bits, key groups larger than value groups, keys per token, values
# per channel (the same grid as the layer tests).
SPECS = [
    "k8v8-g16-r0",
    "k4v2-plain-g16-r16-s4",
    "k3v3-plain-g16-r32",
    "k2v4-plain-gk32-gv16-r16-s3",
    "k4v4-plain-g16-r16-kt",
    "k4v8-plain-gk16-gv32-r0-s1-vc",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return default_tokenizer()


def saved(
    model: PreTrainedModel, path: Path, spec: str = "k4v4-plain-g16-r16-s2", tokens: int = 40, **kwargs: Any
) -> Path:
    cache = prefix_cache(model, prompt(tokens=tokens, seed=11), spec)
    cache.save(path, model, **kwargs)
    return path


# -- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 37, 100])
@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_is_bit_exact_and_continues_identically(
    model: PreTrainedModel, spec: str, tokens: int, tmp_path: Path
) -> None:
    ids = prompt(batch=2, tokens=tokens, seed=tokens)
    original = prefix_cache(model, ids, spec)
    original.save(tmp_path / "c.kvpc", model)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", model)
    assert_same_states(original, loaded)
    assert torch.equal(loaded.prefix_ids, ids) and loaded.cache_config == original.cache_config
    assert loaded.get_seq_length() == tokens and loaded.prefill_s == original.prefill_s
    more = prompt(batch=2, tokens=60, seed=99)
    for a, b in zip(continue_steps(model, original, more), continue_steps(model, loaded, more), strict=True):
        assert torch.equal(a, b)
    assert_same_states(original, loaded)  # packing after the load went exactly as without it


def test_loaded_cache_on_the_fused_path_continues_identically(llama: PreTrainedModel, tmp_path: Path) -> None:
    backend = "torch"  # the reference; the real-model test below runs the default (auto) kernel
    model = copy.deepcopy(llama)
    use_kvpack_attention(model)
    ids = prompt(tokens=70, seed=5)
    original = prefix_cache(model, ids, "k4v4-plain-g16-r16", backend=backend)
    original.save(tmp_path / "c.kvpc", model)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", model, backend=backend)
    assert loaded.backend == backend
    more = prompt(tokens=40, seed=6)
    for a, b in zip(continue_steps(model, original, more), continue_steps(model, loaded, more), strict=True):
        assert torch.equal(a, b)


def test_loaded_cache_generates_what_a_fresh_prefill_generates(model: PreTrainedModel, tmp_path: Path) -> None:
    ids = prompt(tokens=53, seed=21)
    question = prompt(tokens=7, seed=22)
    kwargs: dict[str, Any] = dict(max_new_tokens=30, do_sample=False, return_dict_in_generate=True, output_logits=True)
    fresh_cache = prefix_cache(model, ids, "k4v4-plain-g16-r16")
    fresh_cache.save(tmp_path / "c.kvpc", model)
    full = torch.cat([ids, question], dim=1)
    fresh = model.generate(full, **cache_kwargs(model, fresh_cache), pad_token_id=0, **kwargs)
    loaded_cache = KVPackCache.load(tmp_path / "c.kvpc", model)
    spare = copy.deepcopy(loaded_cache)  # the documented way to reuse one load for several prompts
    for cache in (loaded_cache, spare):
        assert cache.prefix_ids is not None
        out = model.generate(
            torch.cat([cache.prefix_ids, question], 1), **cache_kwargs(model, cache), pad_token_id=0, **kwargs
        )
        assert torch.equal(out.sequences, fresh.sequences)
        for a, b in zip(out.logits, fresh.logits, strict=True):
            assert torch.equal(a, b)


def test_past_recording_state_round_trips_and_rolls_back_identically(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = KVPackCache(llama, "k8v8-g16-r16")
    for layer in cache.layers:
        layer.activate_past_recording()
    with torch.no_grad():
        llama(prompt(tokens=50, seed=2), **cache_kwargs(llama, cache))
    assert all(layer.shadow_len == 16 for layer in cache.layers)
    cache.save(tmp_path / "c.kvpc", llama, prompt(tokens=50, seed=2))
    loaded = KVPackCache.load(tmp_path / "c.kvpc", llama)
    assert_same_states(cache, loaded)
    for c in (cache, loaded):
        c.crop(-10)  # leaves fewer than `residual` exact tokens: un-packs the shadow block
    assert_same_states(cache, loaded)


def test_sliding_layers_keep_dropped_token_counts(gemma: PreTrainedModel, tmp_path: Path) -> None:
    original = prefix_cache(gemma, prompt(tokens=120, seed=4), "k4v4-plain-g16-r16")
    sliding = original.layers[0]
    assert sliding.is_sliding and sliding.stored_tokens() < sliding.seen_tokens == 120
    original.save(tmp_path / "c.kvpc", gemma)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", gemma)
    assert_same_states(original, loaded)
    assert loaded.layers[0].get_mask_sizes(1) == sliding.get_mask_sizes(1)


def test_file_is_plain_safetensors_with_only_valid_tokens(llama: PreTrainedModel, tmp_path: Path) -> None:
    from safetensors import safe_open

    cache = prefix_cache(llama, prompt(tokens=70, seed=1), "k4v4-plain-g16-r16")
    cache.save(tmp_path / "c.kvpc", llama)
    file = read_cache_file(tmp_path / "c.kvpc")
    with safe_open(tmp_path / "c.kvpc", framework="pt") as f:
        assert json.loads(f.metadata()["kvpack"])["format"] == "kvpack.prompt-cache"
        assert set(f.keys()) == set(file.tensors)
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert torch.equal(f.get_tensor(name), file.tensors[name])
    layer = cache.layers[0]
    assert isinstance(layer, PackedLayer)
    assert file.tensors["layers.0.residual_keys"].shape[2] == layer.residual_len == 22  # not the 32-token buffer
    assert file.tensors["layers.0.packed_keys.codes"].shape[2] == 48 // 16
    assert file.header.token_ids == tuple(tuple(row) for row in prompt(tokens=70, seed=1).tolist())
    # No spare capacity on disk: the tensors hold what the cache holds, and no more.
    assert sum(t.numel() * t.element_size() for t in file.tensors.values()) <= cache.nbytes()


def test_file_bytes_are_what_safetensors_writes(llama_file: Path) -> None:
    """The layout is the library's for these tensors and this metadata (as every kvpack version wrote it)."""
    import safetensors.torch

    file = read_cache_file(llama_file)
    metadata = {"kvpack": json.dumps(file.header.to_dict())}
    assert llama_file.read_bytes() == safetensors.torch.save(file.tensors, metadata=metadata)


def test_read_tensors_do_not_change_with_the_file(llama_file: Path) -> None:
    file = read_cache_file(llama_file)
    before = {name: t.clone() for name, t in file.tensors.items()}
    llama_file.write_bytes(bytes(llama_file.stat().st_size))  # overwritten in place, same size
    assert all(torch.equal(file.tensors[name], t) for name, t in before.items())


def test_loads_onto_the_models_device(llama: PreTrainedModel, tmp_path: Path, device: torch.device) -> None:
    model = copy.deepcopy(llama).to(device)
    saved(model, tmp_path / "c.kvpc")
    loaded = KVPackCache.load(tmp_path / "c.kvpc", model)
    assert layer_devices(model, 2) == [model.device] * 2
    for layer in loaded.layers:
        assert all(t.device == model.device for t in layer.state().tensors().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a per-layer device map across CPU and GPU")
def test_loads_each_layer_onto_its_device_in_a_device_map(llama: PreTrainedModel, tmp_path: Path) -> None:
    from accelerate import dispatch_model

    model = dispatch_model(
        copy.deepcopy(llama),
        device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                    "model.rotary_emb": 0, "lm_head": "cpu"},
    )  # fmt: skip
    ids = prompt(tokens=40, seed=3)
    original = prefix_cache(model, ids, "k4v4-plain-g16-r16")
    original.save(tmp_path / "c.kvpc", model)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", model)
    assert [layer.device.type for layer in loaded.layers] == ["cuda", "cpu"]
    assert_same_states(original, loaded)


# -- saving --------------------------------------------------------------------------------------------------------


def test_save_refuses_an_empty_cache_and_wrong_token_ids(llama: PreTrainedModel, tmp_path: Path) -> None:
    with pytest.raises(KVPackError, match="holds no tokens"):
        KVPackCache(llama, "k4v4-plain-g16-r16").save(tmp_path / "c.kvpc", llama, [1, 2])
    cache = KVPackCache(llama, "k4v4-plain-g16-r16")
    with torch.no_grad():
        llama(prompt(tokens=20), **cache_kwargs(llama, cache))
    with pytest.raises(KVPackError, match="pass token_ids"):
        cache.save(tmp_path / "c.kvpc", llama)
    with pytest.raises(KVPackError, match=r"shape \[batch=1, tokens=20\]"):
        cache.save(tmp_path / "c.kvpc", llama, prompt(tokens=19))
    assert not list(tmp_path.iterdir())
    cache.save(tmp_path / "c.kvpc", llama, prompt(tokens=20)[0])  # a 1-D list of ids is one row
    assert [p.name for p in tmp_path.iterdir()] == ["c.kvpc"]


# -- refusals ------------------------------------------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(safetensors index, kvpack header, tensor data) of a file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    index = json.loads(data[8 : 8 + n])
    return index, json.loads(index["__metadata__"]["kvpack"]), data[8 + n :]


def join_file(path: Path, index: dict[str, Any], header: dict[str, Any] | None, data: bytes, resign: bool) -> None:
    """Write a file from its parts; with `resign`, the checksum is recomputed (when the header still parses), so
    that the checks after the checksum see the change."""
    if header is not None:
        if resign:
            header = {**header, "checksum": resigned(header, index, data)}
        index = {**index, "__metadata__": {"kvpack": json.dumps(header)}}
    raw = json.dumps(index).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def resigned(header: dict[str, Any], index: dict[str, Any], data: bytes) -> Any:
    """The checksum of `header` over the tensors that `index` and `data` make (as safetensors reads them), or the
    old checksum where they make no file or `header` does not parse."""
    import safetensors.torch
    from safetensors import SafetensorError

    raw = json.dumps(index).encode()
    try:
        tensors = safetensors.torch.load(len(raw).to_bytes(8, "little") + raw + data)
        return content_sha256(CacheFileHeader.from_dict(header), tensors)
    except (CacheFileError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError):
        return header.get("checksum")


def rewrite(path: Path, change: Callable[[dict[str, Any]], None], resign: bool = True) -> Path:
    index, header, data = split_file(path)
    change(header)
    join_file(path, index, header, data, resign)
    return path


def mistral_config() -> MistralConfig:
    """The tiny Llama's shapes in another architecture."""
    fields = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
              "vocab_size", "head_dim", "max_position_embeddings")  # fmt: skip
    llama = llama_config()
    return MistralConfig(sliding_window=None, **{name: getattr(llama, name) for name in fields})


@pytest.fixture
def llama_file(llama: PreTrainedModel, tmp_path: Path) -> Path:
    return saved(llama, tmp_path / "c.kvpc")


def load_error(path: Path, model: PreTrainedModel, tokenizer: Any = None) -> CacheFileError:
    with pytest.raises(CacheFileError) as info:
        KVPackCache.load(path, model, tokenizer)
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("make_model", "check"),
    [
        pytest.param(lambda: LlamaForCausalLM(llama_config(num_hidden_layers=3)), "shapes", id="more-layers"),
        pytest.param(lambda: LlamaForCausalLM(llama_config(num_key_value_heads=4)), "shapes", id="more-kv-heads"),
        pytest.param(lambda: LlamaForCausalLM(llama_config(rope_theta=5e5)), "config", id="rope-theta"),
        pytest.param(lambda: LlamaForCausalLM(llama_config()).to(torch.bfloat16), "dtype", id="bfloat16"),
        pytest.param(lambda: MistralForCausalLM(mistral_config()), "architecture", id="mistral"),
        pytest.param(lambda: Gemma3ForCausalLM(gemma_config()), "architecture", id="gemma3"),
    ],
)
def test_another_model_is_refused_naming_the_check(
    llama_file: Path, make_model: Callable[[], PreTrainedModel], check: str
) -> None:
    torch.manual_seed(0)  # the same weights where the shapes allow: only the named difference remains
    error = load_error(llama_file, make_model().eval())
    assert isinstance(error, CacheModelMismatchError) and error.check == check
    assert "built for another model" in str(error) and "rebuild it" in str(error)


def test_other_weights_are_refused(llama_file: Path, llama: PreTrainedModel) -> None:
    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # a fine-tune of one matrix
    error = load_error(llama_file, other)
    assert isinstance(error, CacheModelMismatchError) and error.check == "weights"


def test_another_tokenizer_is_refused(llama: PreTrainedModel, tokenizer: Any, tmp_path: Path) -> None:
    path = saved(llama, tmp_path / "c.kvpc", tokenizer=tokenizer)
    KVPackCache.load(path, llama, tokenizer)
    KVPackCache.load(path, llama)  # without a tokenizer at hand, ids are the caller's to check
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<kvpack-test-token>"])
    error = load_error(path, llama, other)
    assert isinstance(error, CacheModelMismatchError) and error.check == "tokenizer"


def test_fingerprint_is_the_same_in_another_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, json; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "from kvpack.cache.persist import ModelFingerprint; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps(ModelFingerprint.of(m, t).to_dict()))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    assert json.loads(runs[0].stdout) == json.loads(runs[1].stdout)


def test_another_schema_version_is_refused_before_anything_else(llama_file: Path, llama: PreTrainedModel) -> None:
    def future(header: dict[str, Any]) -> None:
        header["schema_version"] = 2
        header["layers"] = "a field this version would not understand"

    error = load_error(rewrite(llama_file, future, resign=False), llama)
    assert isinstance(error, CacheVersionError) and error.check == "schema"
    assert "schema version 2" in str(error) and "reads version 1" in str(error)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_changed_payload_byte_fails_the_checksum(llama_file: Path, llama: PreTrainedModel, where: str) -> None:
    data = bytearray(llama_file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    position = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]
    data[position] ^= 0x01
    llama_file.write_bytes(bytes(data))
    error = load_error(llama_file, llama)
    assert isinstance(error, CacheChecksumError) and error.check == "checksum"


def test_a_changed_header_value_fails_the_checksum(llama_file: Path, llama: PreTrainedModel) -> None:
    def edit(header: dict[str, Any]) -> None:
        header["token_ids"][0][3] += 1

    error = load_error(rewrite(llama_file, edit, resign=False), llama)
    assert isinstance(error, CacheChecksumError)


def test_swapped_tensors_of_one_shape_fail_the_checksum(llama_file: Path, llama: PreTrainedModel) -> None:
    index, header, data = split_file(llama_file)
    a, b = "layers.0.residual_keys", "layers.0.residual_values"
    assert index[a]["shape"] == index[b]["shape"]
    index[a]["data_offsets"], index[b]["data_offsets"] = index[b]["data_offsets"], index[a]["data_offsets"]
    join_file(llama_file, index, header, data, resign=False)
    error = load_error(llama_file, llama)
    assert isinstance(error, CacheChecksumError)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000, -1])
def test_a_truncated_file_is_refused(llama_file: Path, llama: PreTrainedModel, keep: int) -> None:
    data = llama_file.read_bytes()
    llama_file.write_bytes(data[:keep])
    error = load_error(llama_file, llama)
    assert isinstance(error, CacheFormatError) and error.check == "truncated"
    assert "truncated" in str(error)


def test_not_a_prompt_cache_is_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    import safetensors.torch

    safetensors.torch.save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "text.kvpc").write_text("hello, this is not a cache at all" * 10)
    (tmp_path / "empty.kvpc").write_bytes(b"")
    expected = {"plain.safetensors": "format", "text.kvpc": "header", "empty.kvpc": "truncated", "none.kvpc": "file"}
    for name, check in expected.items():
        error = load_error(tmp_path / name, llama)
        assert isinstance(error, CacheFormatError) and error.check == check, (name, error)


def test_trailing_bytes_are_refused(llama_file: Path, llama: PreTrainedModel) -> None:
    llama_file.write_bytes(llama_file.read_bytes() + b"\0")
    error = load_error(llama_file, llama)
    # safetensors reports data that does not end where the last tensor does alike, shorter or longer.
    assert (
        isinstance(error, CacheFormatError) and error.check == "truncated" and "bytes after its tensors" in str(error)
    )


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("residual", 10**9, "context"),
        ("sinks", 10**9, "layers"),  # 2 sinks held of 10**9 while other tokens are held: no layer gets there
        ("residual", -1, "header"),
        ("bits", 5, "header"),
    ],
)
def test_forged_config_sizes_are_refused_before_allocating(
    llama_file: Path, llama: PreTrainedModel, field: str, value: int, check: str
) -> None:
    def forge(header: dict[str, Any]) -> None:
        config = header["cache_config"]
        (config["key"] if field == "bits" else config)[field] = value

    start = time.perf_counter()
    error = load_error(rewrite(llama_file, forge), llama)
    assert error.check == check and time.perf_counter() - start < 5


def test_a_forged_window_allocates_only_what_the_file_holds(llama_file: Path, llama: PreTrainedModel) -> None:
    """A header may ask for the longest residual window the model's context admits (a small file, re-signed); the
    loaded cache still holds only the file's tokens, so what a file makes kvpack allocate is bounded by its size."""
    context = llama.config.max_position_embeddings

    def forge(header: dict[str, Any]) -> None:
        header["cache_config"]["residual"] = context

    file = read_cache_file(rewrite(llama_file, forge))
    cache = KVPackCache.load(llama_file, llama)
    assert cache.cache_config.residual == context
    assert cache.nbytes() <= sum(t.numel() * t.element_size() for t in file.tensors.values())


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda h: h["layers"][0].update(seen_tokens=41), "tokens seen"),
        (lambda h: h["layers"][0].update(residual_len=1000, seen_tokens=1000), "tokens seen"),
        (lambda h: h["layers"][1].update(kind="sliding"), "kind sliding"),
        (lambda h: h["layers"].pop(), "layers"),
        (lambda h: h["layers"][0].update(shadow_len=16), "shadow"),
        (lambda h: h["token_ids"].append(h["token_ids"][0]), "do not match its layers"),
        (lambda h: h["model"].update(head_dim=32), "do not match its layers"),
        (lambda h: h["model"]["layer_plan"].__setitem__(1, "sliding"), "layer_plan"),  # a window is a number
        (lambda h: h["model"]["layer_plan"].__setitem__(1, "sliding:0"), "layer_plan"),
        (lambda h: h["model"]["layer_plan"].__setitem__(1, "sliding:x"), "layer_plan"),
    ],
)
def test_inconsistent_layers_are_refused(
    llama_file: Path, llama: PreTrainedModel, change: Callable[[dict[str, Any]], None], detail: str
) -> None:
    error = read_error(rewrite(llama_file, change))
    assert error.check in ("layers", "header") and detail in str(error)


def read_error(path: Path) -> CacheFileError:
    with pytest.raises(CacheFileError) as info:
        read_cache_file(path)
    return info.value


def test_forged_header_length_is_refused_without_reading_it(llama_file: Path) -> None:
    data = bytearray(llama_file.read_bytes())
    for forged in (MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1):
        data[:8] = forged.to_bytes(8, "little")
        llama_file.write_bytes(bytes(data))
        assert read_error(llama_file).check == "header"
    data[:8] = (len(data) - 7).to_bytes(8, "little")
    llama_file.write_bytes(bytes(data))
    assert read_error(llama_file).check == "truncated"


def test_forged_tensor_shapes_and_offsets_are_refused(llama_file: Path) -> None:
    written = read_cache_file(llama_file).tensors
    index, header, data = split_file(llama_file)
    name = "layers.0.residual_keys"
    for forged in (
        {"shape": [2**40, 2**40, 2**40, 2**40]},
        {"shape": [1, 2, -1, 16]},
        {"shape": [0, 2**40, 2**40, 2**40], "data_offsets": [0, 0]},  # empty, yet its strides overflow
        {"data_offsets": [0, 2**62]},
        {"dtype": "F64"},
        {"dtype": "I64"},
        {"dtype": "I64", "shape": [*index[name]["shape"][:-1], index[name]["shape"][-1] // 2]},  # same bytes
    ):
        join_file(llama_file, {**index, name: {**index[name], **forged}}, header, data, resign=True)
        error = read_error(llama_file)
        assert error.check in ("header", "truncated"), (forged, error)
    empty = "layers.0.shadow_keys"  # no tokens: a shape with a zero anywhere fits its (zero) bytes
    for shape, check in (([0, 2**63], "header"), ([2**31, 0, 2**40], "layers")):  # beyond torch's range; absurd
        join_file(llama_file, {**index, empty: {**index[empty], "shape": shape}}, header, data, resign=True)
        assert read_error(llama_file).check == check, shape
    # A field safetensors does not know is ignored, as by every safetensors reader: the tensors (all the checksum
    # covers) are those written.
    join_file(llama_file, {**index, name: {**index[name], "extra": 1}}, header, data, resign=False)
    assert torch.equal(read_cache_file(llama_file).tensors[name], written[name])


# -- fuzz: whatever the bytes, only kvpack's own errors, quickly, with bounded memory ---------------------------------


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory, llama: PreTrainedModel) -> bytes:
    return saved(
        llama, tmp_path_factory.mktemp("fuzz") / "base.kvpc", spec="k4v4-plain-g16-r16-s2", tokens=40
    ).read_bytes()


def try_load(path: Path, model: PreTrainedModel, base_nbytes: int) -> None:
    """Load `path`: a success must not hold more than a fresh cache of at most the model's context would (so a
    forged header cannot make it allocate at will); a failure must be a `CacheFileError`, quickly."""
    start = time.perf_counter()
    try:
        cache = KVPackCache.load(path, model)
    except CacheFileError:
        pass
    else:
        context = model.config.max_position_embeddings
        per_token = max(base_nbytes // 40, 1)
        assert cache.nbytes() <= per_token * (context + 128) * 16
    assert time.perf_counter() - start < 10


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63, 10**12])
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def plausible(original: Any) -> st.SearchStrategy[Any]:
    """Values of the original's type, near it or at the edges, so that mutations get past type checks."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        near = st.integers(-2, 2).map(lambda d: original + d)
        return near | st.sampled_from([0, 1, 2**31, 2**62, 10**12]) | st.integers(0, 2**64)
    if isinstance(original, str):
        return st.text(max_size=10) | st.just(original + "x") | st.just(original[:-1])
    if isinstance(original, list) and original:
        return st.sampled_from([original[:-1], original + original[-1:], original[::-1], []])
    return JSON_VALUES


def json_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += json_paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:3]):
            paths += json_paths(child, (*path, i))
    return paths


def set_path(root: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return root


def fuzz_header_field(
    fuzz_base: bytes, llama: PreTrainedModel, tmp_path: Path, data: st.DataObject, in_index: bool
) -> None:
    path = tmp_path / "f.kvpc"
    path.write_bytes(fuzz_base)
    index, header, payload = split_file(path)
    target = index if in_index else header
    where = data.draw(st.sampled_from([p for p in json_paths(target) if not in_index or p[:1] != ("__metadata__",)]))
    delete = bool(where) and data.draw(st.booleans())
    original: Any = target
    for key in where:
        original = original[key]
    value = data.draw(plausible(original) | JSON_VALUES)
    target = set_path(target, where, copy.deepcopy(value), delete)
    if in_index:
        index = target if isinstance(target, dict) else {"x": target}
        join_file(path, index, header, payload, resign=True)
    else:
        join_file(path, index, target if isinstance(target, dict) else {"x": target}, payload, resign=True)
    try_load(path, llama, len(fuzz_base))


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_header_fields(fuzz_base: bytes, llama: PreTrainedModel, tmp_path: Path, data: st.DataObject) -> None:
    fuzz_header_field(fuzz_base, llama, tmp_path, data, in_index=False)


@FUZZ
@given(data=st.data())
def test_fuzz_tensor_index(fuzz_base: bytes, llama: PreTrainedModel, tmp_path: Path, data: st.DataObject) -> None:
    fuzz_header_field(fuzz_base, llama, tmp_path, data, in_index=True)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    header_only=st.booleans(),
    cut=st.none() | st.floats(0, 1),
)
def test_fuzz_bytes(
    fuzz_base: bytes,
    llama: PreTrainedModel,
    tmp_path: Path,
    edits: list[tuple[float, int]],
    header_only: bool,
    cut: float | None,
) -> None:
    data = bytearray(fuzz_base)
    span = 8 + int.from_bytes(data[:8], "little") if header_only else len(data)
    for where, byte in edits:
        data[int(where * span)] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / "f.kvpc"
    path.write_bytes(bytes(data))
    try_load(path, llama, len(fuzz_base))


@pytest.mark.slow
@FUZZ_SLOW
@given(data=st.data(), in_index=st.booleans())
def test_fuzz_header_fields_longer(
    fuzz_base: bytes, llama: PreTrainedModel, tmp_path: Path, data: st.DataObject, in_index: bool
) -> None:
    fuzz_header_field(fuzz_base, llama, tmp_path, data, in_index)


# -- the real model ------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["k8v8", "k4v4"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
def test_real_model_generates_from_a_loaded_prefix_as_after_a_fresh_prefill(
    default_model: tuple[Any, Any], spec: str, fused: bool, tmp_path: Path
) -> None:
    model, tokenizer = default_model
    previous = model.config._attn_implementation
    if fused:
        use_kvpack_attention(model)
    try:
        document = (ROOT / "examples" / "handbook.txt").read_text().strip()
        ids = tokenizer(document, return_tensors="pt").input_ids
        question = tokenizer(
            "\n\nIn what year was the light converted to electricity?", add_special_tokens=False, return_tensors="pt"
        ).input_ids
        full = torch.cat([ids, question], dim=1).to(model.device)
        fresh_cache = prefix_cache(model, ids, spec)
        fresh_cache.save(tmp_path / "doc.kvpc", model, tokenizer=tokenizer)
        kwargs: dict[str, Any] = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(full))
        fresh = model.generate(full, **cache_kwargs(model, fresh_cache), **kwargs)
        loaded_cache = KVPackCache.load(tmp_path / "doc.kvpc", model, tokenizer)
        assert loaded_cache.prefix_ids is not None and torch.equal(loaded_cache.prefix_ids, ids)
        loaded = model.generate(full, **cache_kwargs(model, loaded_cache), **kwargs)
    finally:
        model.set_attn_implementation(previous)
    assert torch.equal(loaded, fresh)
    assert loaded.shape[1] == full.shape[1] + 12
