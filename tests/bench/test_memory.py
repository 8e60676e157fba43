"""`kvpack memory`: the exact formula vs filled caches, max context, weights, Markdown, --measure and the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    T5Config,
)
from transformers.cache_utils import DummyLayer
from transformers.pytorch_utils import Conv1D

from kvpack import cli
from kvpack.bench import memory
from kvpack.bench.memory import cache_bytes, max_context, memory_table, parse_cache
from kvpack.cache import KVPackCache
from kvpack.cache.plan import CacheShape, cache_shape
from kvpack.errors import ConfigError, KVPackError, ModelNotFoundError, ShapeError

ROOT = Path(__file__).resolve().parents[2]

# Default residual 128 + block 64 = 192: lengths on both sides of it, block boundaries, and past the windows.
LENGTHS = (1, 3, 40, 191, 192, 193, 256, 300, 700)
SPECS = (
    "k4v4-plain",
    "k8v8-g32-r32",
    "k2v4-plain-gk32-gv64-r16-s4",  # sinks, different key/value groups
    "k4v2-plain-kt-g32-r8-s3",  # per-token keys: block of 1 token
    "k3v3-plain-g16-r0",  # 3-bit rows straddle bytes, no residual
    "k4v8-plain-vc-gk16-gv64-r5",  # per-channel values: the block is the larger group
)


def llama_config(**overrides: Any) -> LlamaConfig:
    fields: dict[str, Any] = dict(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=100,
        head_dim=64,
        max_position_embeddings=512,
    )
    return LlamaConfig(**{**fields, **overrides})


def gemma_config(**overrides: Any) -> Gemma3TextConfig:
    fields: dict[str, Any] = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=96,
        vocab_size=100,
        head_dim=64,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=512,
    )
    return Gemma3TextConfig(**{**fields, **overrides})


CONFIGS = {
    "llama": llama_config,
    "gemma3-sliding": gemma_config,
    "llama-moe-layer": lambda: llama_config(
        num_hidden_layers=3, layer_types=["full_attention", "moe", "full_attention"]
    ),
}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny tensors: torch's thread pool only adds overhead (and stalls on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def filled(cache: Any, shape: CacheShape, batch: int, length: int, dtype: torch.dtype) -> Any:
    """Call each caching layer's `update` once: the prefill of `length` tokens."""
    size = (batch, shape.kv_heads, length, shape.head_dim)
    keys, values = torch.randn(size).to(dtype), torch.randn(size).to(dtype)
    for layer in cache.layers:
        if not isinstance(layer, DummyLayer):
            layer.update(keys, values)
    return cache


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_formula_equals_nbytes_of_a_filled_cache(config_name: str, spec: str, batch: int) -> None:
    config = CONFIGS[config_name]()
    shape = cache_shape(config)
    kind = parse_cache(spec)
    dtype = torch.bfloat16 if batch == 3 else torch.float32  # residual/sinks in the model dtype
    for length in LENGTHS:
        cache = filled(KVPackCache(config, spec), shape, batch, length, dtype)
        assert cache_bytes(shape, kind, batch, length, dtype) == cache.nbytes(), (spec, length)


def test_sliding_layers_release_what_falls_outside_the_window() -> None:
    # A sliding layer forgets packed blocks older than its window (plus a rollback margin) and releases their
    # storage, so after a long prefill it holds less than a full-attention layer.
    config = gemma_config()
    cache = filled(KVPackCache(config, "k4v4-plain-g16-r16"), cache_shape(config), 1, 700, torch.float32)
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.packed_length < full.packed_length
    assert sliding.nbytes() < full.nbytes()


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_fp_formula_equals_the_dynamic_caches_keys_and_values(config_name: str, name: str) -> None:
    config = CONFIGS[config_name]()
    shape = cache_shape(config)
    kind = parse_cache(name)
    for length in LENGTHS:
        cache = filled(DynamicCache(config=config), shape, 2, length, kind.dtype)
        held = sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
        )
        assert cache_bytes(shape, kind, 2, length, "float32") == held, length


def test_shape_reads_defaults_and_text_sub_configs() -> None:
    config = llama_config(hidden_size=256, num_attention_heads=4)
    config.head_dim = None
    config.num_key_value_heads = None
    shape = cache_shape(config)
    assert (shape.kv_heads, shape.head_dim, shape.layers) == (4, 64, 2)

    multimodal = Gemma3Config(text_config=gemma_config())
    assert cache_shape(multimodal) == cache_shape(gemma_config())
    shape = cache_shape(multimodal)
    cache = filled(KVPackCache(multimodal, "k4v4-plain"), shape, 1, 300, torch.float32)
    assert cache_bytes(shape, parse_cache("k4v4-plain"), 1, 300, torch.float32) == cache.nbytes()


def test_a_spec_that_cannot_hold_the_model_fails_like_the_cache() -> None:
    config = llama_config(head_dim=48)
    shape = cache_shape(config)
    with pytest.raises(ShapeError, match="not divisible"):
        cache_bytes(shape, parse_cache("k4v4-plain"), 1, 10, "float16")
    with pytest.raises(ShapeError):
        filled(KVPackCache(config, "k4v4-plain"), shape, 1, 10, torch.float16)
    cache_bytes(shape, parse_cache("k4v4-plain-gv16"), 1, 10, "float16")  # per-channel keys need no divisibility
    with pytest.raises(ConfigError, match="unknown cache"):
        parse_cache("int4")
    with pytest.raises(ConfigError):
        memory_table(config, ["fp16"], [0], [10])


# -- max context ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["fp16", "k4v4-plain", "k2v4-plain-gk32-gv64-r16-s4", "k4v2-plain-kt-g32-r8-s3"])
def test_max_context_is_the_last_length_that_fits(spec: str) -> None:
    shape = cache_shape(gemma_config())
    kind = parse_cache(spec)

    def total(n: int) -> int:
        return 1000 + cache_bytes(shape, kind, 2, n, "float16")

    for target in (1, 5, 191, 192, 193, 640, 1000):
        for budget in (total(target) - 1, total(target), total(target) + 1):
            n = max_context(shape, kind, 2, "float16", budget, fixed_bytes=1000)
            assert n is not None
            # Every length up to N fits (a decoded sequence passes through each); the bytes dip where a block is
            # packed, so a longer prefill can fit where a shorter one does not: that does not count.
            brute = next(m for m in range(1, 1300) if total(m) > budget) - 1
            assert n == brute, (target, budget)


def test_max_context_edge_cases() -> None:
    shape = cache_shape(llama_config())
    fp16 = parse_cache("fp16")
    exact = cache_bytes(shape, fp16, 1, 777, "float16")
    assert max_context(shape, fp16, 1, "float16", exact) == 777
    assert max_context(shape, fp16, 1, "float16", exact, fixed_bytes=exact + 1) == 0
    all_sliding = cache_shape(gemma_config(layer_types=["sliding_attention"] * 3))
    assert max_context(all_sliding, fp16, 1, "float16", 10**9) is None  # window layers stop growing


@pytest.mark.parametrize("spec", ["fp16", "k8v8", "k4v4-plain-s4"])
def test_max_context_of_an_all_sliding_cache_ends_for_every_budget(spec: str) -> None:
    """A cache made only of window layers stops growing, but its exact bytes dip and rise with each packed block
    below their upper bound: a budget between the two fits every length (None), and the search says so rather than
    walking one token at a time towards 2**40 (it did: a hang)."""
    shape = cache_shape(gemma_config(layer_types=["sliding_attention"] * 3))
    kind = parse_cache(spec)
    exact = [cache_bytes(shape, kind, 1, n, "float16") for n in range(1, 3000)]
    for budget in range(1000, 400_000, 7919):
        n = max_context(shape, kind, 1, "float16", budget)
        first_over = next((m for m, b in enumerate(exact, start=1) if b > budget), None)
        if first_over is None:  # fits every length up to 3000, and the bytes repeat from there: every length
            assert n is None, budget
        else:
            assert n == first_over - 1, budget


# -- weights --------------------------------------------------------------------------------------------------


TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96)
WEIGHT_CONFIGS = {  # architectures of every kind of weight layout the count must follow
    "llama": lambda: LlamaConfig(**TINY, vocab_size=100, head_dim=32, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**TINY, vocab_size=100, tie_word_embeddings=True),
    "llama-biases": lambda: LlamaConfig(**TINY, vocab_size=100, attention_bias=True, mlp_bias=True, head_dim=16),
    "mistral": lambda: MistralConfig(**TINY, vocab_size=100),
    "qwen2-tied": lambda: Qwen2Config(**TINY, vocab_size=100, tie_word_embeddings=True),
    "qwen3-bias": lambda: Qwen3Config(**TINY, vocab_size=100, head_dim=32, attention_bias=True),
    "gemma3-text": lambda: gemma_config(),  # scaled embeddings, q/k norms, four norms per layer, tied
    "mixtral-moe": lambda: MixtralConfig(**TINY, vocab_size=100, num_local_experts=4),  # fused 3-D expert tensors
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0),
}


@pytest.mark.parametrize("name", list(WEIGHT_CONFIGS))
def test_meta_device_weights_equal_a_real_models_parameters(name: str) -> None:
    # The meta-device model must list what a real (random, tiny) model holds: every tensor once, tied ones once.
    config = WEIGHT_CONFIGS[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    tensors = memory.weight_tensors(config)
    assert [(t.name, t.shape) for t in tensors] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert memory.weight_bytes(tensors, "fp16") == sum(p.nbytes for p in model.parameters())
    assert memory.memory_table(config, ["fp16"], [1], [8], weights=["fp16"])["weights"]["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    # int8/int4 quantize the weight matrices along their input channels; embeddings and lm_head stay float16.
    head = model.get_output_embeddings()
    for t in tensors:
        owner = model.get_submodule(t.name.rpartition(".")[0])
        if len(t.shape) == 1 or isinstance(owner, torch.nn.Embedding) or owner is head:
            assert t.inputs is None, t.name
        elif isinstance(owner, torch.nn.Linear):
            assert t.inputs == owner.in_features, t.name
        elif isinstance(owner, Conv1D):  # GPT-2 stores W as [in, out]
            assert t.inputs == owner.nx, t.name
        else:  # Mixtral's router and its fused experts, [experts, out, in]
            inputs = {"weight": config.hidden_size, "gate_up_proj": config.hidden_size}
            assert t.inputs == inputs.get(t.name.rpartition(".")[2], config.intermediate_size), t.name
    if config.tie_word_embeddings:
        assert not any(t.name.startswith("lm_head") for t in tensors)


def test_weight_bytes_per_format() -> None:
    tensors = [
        memory.WeightTensor("model.embed_tokens.weight", (10, 128), None),
        memory.WeightTensor("model.layers.0.mlp.up_proj.weight", (4, 128), 128),
        memory.WeightTensor("model.layers.0.mlp.experts.down_proj", (2, 4, 96), 96),  # 8 rows of 96: 2 int4 groups
        memory.WeightTensor("model.layers.0.mlp.up_proj.bias", (4,), None),
        memory.WeightTensor("model.norm.weight", (128,), None),
    ]
    kept = 2 * (10 * 128 + 4 + 128)  # embeddings, bias and norm stay float16
    assert memory.weight_bytes(tensors, "fp16") == 2 * (10 * 128 + 4 * 128 + 2 * 4 * 96 + 4 + 128)
    assert memory.weight_bytes(tensors, "int8") == kept + 4 * 128 + 4 * 2 + 8 * 96 + 8 * 2
    assert memory.weight_bytes(tensors, "int4") == kept + 4 * 64 + 4 * 2 * (2 + 2) + 8 * 48 + 8 * 2 * (2 + 2)
    with pytest.raises(ConfigError):
        memory.weight_bytes(tensors, "int3")


def test_weights_of_a_config_without_a_causal_lm_are_left_out_with_a_reason() -> None:
    config = T5Config(d_model=256, num_layers=2, num_heads=4, d_kv=64, d_ff=96, vocab_size=100)
    result = memory_table(config, ["fp16", "k4v4-plain"], [1], [64], weights=["fp16"], budget_gib=1)
    assert "no causal LM" in result["weights"]["error"] and "T5Config" in result["weights"]["error"]
    assert all("total_bytes" not in cell for cell in result["cells"])
    assert {row["weights"] for row in result["max_context"]["rows"]} == {None}
    assert "Weights not shown" in memory.to_markdown(result)


def parameter_count(config: PretrainedConfig) -> int:
    return sum(math.prod(t.shape) for t in memory.weight_tensors(config))


def test_llama_2_7b_config_file() -> None:
    config, name = memory.load_config(str(ROOT / "benchmarks" / "configs" / "llama-2-7b.json"))
    assert name.endswith("llama-2-7b.json")
    shape = cache_shape(config)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (32, 32, 128)
    assert memory.model_summary(config)["max_position_embeddings"] == 4096
    assert parameter_count(config) == 6_738_415_616  # Llama-2-7B's count
    fp16 = cache_bytes(shape, parse_cache("fp16"), 1, 4096, "float16")
    assert fp16 == 4096 * 32 * 32 * 128 * 2 * 2  # 2 GiB, the well-known figure


# -- the table and its Markdown -------------------------------------------------------------------------------


def test_table_cells_ratios_totals_and_markdown() -> None:
    specs = ["fp16", "bf16", "k8v8", "k4v4-plain-s4", "k2v4-plain-gk32-gv64-r16"]
    result = memory_table(llama_config(), specs, [1, 4], [64, 1024], "float16", weights=["fp16", "int4"], budget_gib=1)
    assert len(result["cells"]) == 2 * 2 * len(specs)
    names = [c["name"] for c in result["caches"]]
    assert names == ["fp16", "bf16", "k8v8-g64-r128", "k4v4-plain-g64-r128-s4", "k2v4-plain-gk32-gv64-r16"]
    weights = result["weights"]["bytes"]
    for cell in result["cells"]:
        if cell["cache"] in ("fp16", "bf16"):
            assert cell["vs_fp16"] == 1.0
        assert cell["total_bytes"] == {fmt: size + cell["bytes"] for fmt, size in weights.items()}
    rows = result["max_context"]["rows"]
    assert len(rows) == len(specs) * 3 * 2  # caches x (cache only, fp16, int4) x batches
    json.dumps(result)  # JSON-ready

    markdown = memory.to_markdown(result)
    for name in names:
        assert f"`{name}`" in markdown
    for heading in ("## Batch 1", "## Batch 4", "## Weights", "### Total: int4 weights", "## Max context in 1 GiB"):
        assert heading in markdown
    assert result["weights"]["method"] in markdown
    assert "1,024 †" in markdown  # beyond max_position_embeddings=512


# -- --measure ------------------------------------------------------------------------------------------------


def test_measure_fills_real_caches_and_agrees() -> None:
    specs = ["fp16", "k4v4-plain", "k2v4-plain-gk32-gv64-r16-s4"]
    report = memory.measure_cells(gemma_config(), specs, [(1, 300), (2, 50)], "float32")
    assert len(report["rows"]) == 2 * len(specs)
    for row in report["rows"]:
        assert row["formula_bytes"] == row["nbytes"]
        assert not row["checked"] and "under 64 MiB" in row["note"]  # too small for a meaningful RSS check
    fp16_long = next(r for r in report["rows"] if r["cache"] == "fp16" and r["length"] == 300)
    assert fp16_long["storage_bytes"] > fp16_long["nbytes"]  # transformers' window: a view of the prefill
    assert "view of the prefill" in fp16_long["note"]
    skipped = memory.measure_cells(llama_config(), ["fp16"], [(1, 100)], max_gib=1e-6)
    assert skipped["rows"] == [] and skipped["skipped"][0]["length"] == 100


def test_measure_raises_when_the_formula_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    exact = memory.cache_bytes
    monkeypatch.setattr(memory, "cache_bytes", lambda *args: exact(*args) + 1)
    with pytest.raises(KVPackError, match="the formula gives"):
        memory.measure_cells(llama_config(), ["k4v4-plain"], [(1, 300)])


def test_measure_raises_when_memory_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "MEASURE_MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 10**9)  # the process "gained" nothing
    with pytest.raises(KVPackError, match="the process gained 0 bytes"):
        memory.measure_cells(llama_config(), ["k4v4-plain"], [(1, 300)])


def test_default_measure_cells() -> None:
    assert memory.default_measure_cells([1, 4, 16], [512, 1024, 2048]) == [(1, 512), (1, 2048), (4, 512), (4, 2048)]
    assert memory.default_measure_cells([8], [64, 128, 256]) == [(8, 64), (8, 128)]


# -- command line ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def test_cli_writes_json_and_markdown_with_provenance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "tiny.json"
    llama_config().to_json_file(str(config_path))
    parser = _parser()
    assert "cache memory by batch × length for a model config" in parser.format_help()  # noqa: RUF001
    out_json, out_md = tmp_path / "r" / "memory.json", tmp_path / "r" / "memory.md"
    argv = [
        "memory",
        "--model",
        str(config_path),
        "--caches",
        "fp16,k4v4-plain",
        "--batch",
        "1,2",
        "--lengths",
        "64,256",
    ]
    argv += ["--weights", "fp16,int4", "--budget-gib", "0.01", "--measure", "--json", str(out_json)]
    argv += ["--markdown", str(out_md)]
    assert cli.main(argv) == 0  # sets --threads (1); the fixture restores the previous count
    result = json.loads(out_json.read_text())
    assert result["command"].startswith(f"kvpack memory --model {config_path} --caches fp16,k4v4-plain")
    assert {"date", "machine", "versions", "measurements", "weights", "max_context"} <= result.keys()
    assert {"kvpack", "torch", "transformers"} <= result["versions"].keys()
    assert result["machine"]["platform"]
    markdown = out_md.read_text()
    assert markdown == capsys.readouterr().out.rstrip("\n") + "\n"
    assert result["versions"]["transformers"] in markdown and result["command"] in markdown
    assert "## Measured" in markdown


def test_cli_rejects_bad_options_before_loading(tmp_path: Path) -> None:
    parser = _parser()
    for bad in (["--caches", "k5v4"], ["--batch", "1,x"], ["--weights", "int3"], ["--lengths", "0"]):
        args = parser.parse_args(["memory", "--model", str(tmp_path / "missing.json"), *bad])
        with pytest.raises(ConfigError):
            args.func(args)


def test_load_config_from_a_directory_and_clear_errors(tmp_path: Path) -> None:
    llama_config().save_pretrained(str(tmp_path / "model"))
    config, _ = memory.load_config(str(tmp_path / "model"))
    assert cache_shape(config) == cache_shape(llama_config())
    with pytest.raises(ModelNotFoundError, match="without a download"):
        memory.load_config(str(tmp_path / "nowhere"))
    (tmp_path / "no_type.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ModelNotFoundError, match="model_type"):
        memory.load_config(str(tmp_path / "no_type.json"))


@pytest.mark.slow
def test_default_model_config_loads_without_weights() -> None:
    config, name = memory.load_config(None)
    shape = cache_shape(config)
    assert name == "smollm2-135m-instruct"
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (30, 3, 64)
    assert parameter_count(config) == 134_515_008  # SmolLM2-135M, tied
