"""`kvpack bench decode` end to end on a tiny local model: every cache and kernel measured, report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpack import cli
from kvpack.attention import cpu
from kvpack.attention.registry import kvpack_attention
from kvpack.bench import synthetic
from kvpack.bench.decode import read_bandwidth
from kvpack.cache.plan import cache_shape
from kvpack.errors import ConfigError


def test_bench_decode_writes_rows_for_every_cache_and_kernel(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    caches = "k4v4-plain-g16-r16,fp-prealloc,k4v4-plain-g16-r16@dense,k2v2-plain-g16-r16@torch"
    argv = [
        "bench", "decode", "--caches", caches, "--contexts", "48,96", "--steps", "2", "--backends", "torch,cpu",
        "--spec", "k4v4-plain-g16-r16", "--layers", "2", "--calls", "2", "--model", str(tiny_model_dir), "--threads",
        "1", "--json", str(out), "--profile-steps", "2", "--kernel-threads", "1",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    names = [row["cache"] for row in result["rows"]]
    assert names == ["fp", "k4v4-plain-g16-r16", "fp-prealloc", "k4v4-plain-g16-r16@dense", "k2v2-plain-g16-r16@torch"]
    for row in result["rows"]:
        for context in (48, 96):
            assert row[f"tokens_per_s@{context}"] > 0 and row[f"prefill_s@{context}"] > 0
    fp = result["rows"][0]
    assert fp["speed_vs_fp@96"] == 1.0 and fp["prefill_vs_fp@96"] == 1.0
    for row in result["rows"]:  # every part measured (all caches go through the kvpack attention function)
        profile = row["profile_ms@96"]
        assert all(profile[part] > 0 for part in ("linear", "attention", "cache_update", "other")), row["cache"]
        assert abs(sum(profile[p] for p in ("linear", "attention", "cache_update", "other")) - profile["step"]) < 1e-6
    assert ALL_ATTENTION_FUNCTIONS["kvpack"] is kvpack_attention  # the instrumentation is undone
    kernels = {(row["context"], row["kernel"]) for row in result["attention"]}
    expected = ["kvpack k4v4-plain-g16-r16 (torch)", "kvpack k4v4-plain-g16-r16 (cpu)", "fp32 SDPA"]
    built = cpu.extension().integer_products()  # then the operator alone, integer and float products side by side
    assert result["integer_products"] == {"built": built, "on": cpu.integer_products}
    if built:
        expected += [f"kvpack k4v4-plain-g16-r16 (cpu op, {kind} products)" for kind in ("integer", "float")]
    assert kernels == {(c, k) for c in (48, 96) for k in expected}
    assert {row["threads"] for row in result["attention"]} == {1}
    steps = result["layer_step"]  # the cpu backend was timed: so is a layer's step around it
    assert [row["context"] for row in steps] == [48, 96]
    for row in steps:
        assert row["kernel_us"] > 0 and row["update_us"] > 0 and row["flush_us"] > row["update_us"]
        assert row["around_us"] == row["update_us"] + row["dispatch_us"]
    page = out.with_suffix(".md").read_text()
    assert "| fp-prealloc |" in page and "% of read bandwidth" in page and "Bound on any cache's speedup" in page
    assert "| around the kernel |" in page
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_read_bandwidth_is_positive() -> None:
    measured = read_bandwidth(n_bytes=1 << 22, repeats=2)
    assert measured["read_gb_s"] > 0 and measured["copy_gb_s"] > 0


TINY_SHAPE = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
    "max_position_embeddings": 1024,
}  # fmt: skip


def test_model_shape_decodes_a_random_weight_model_of_that_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(synthetic.MODEL_SHAPES, "tiny", TINY_SHAPE)
    out = tmp_path / "decode.json"
    argv = [
        "bench", "decode", "--model-shape", "tiny", "--caches", "fp-prealloc,k4v4-plain-g16-r16", "--contexts", "80",
        "--steps", "1", "--profile-steps", "0", "--backends", "", "--threads", "1", "--json", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model_shape"] == "tiny" and [row["cache"] for row in result["rows"]] == [
        "fp",
        "fp-prealloc",
        "k4v4-plain-g16-r16",
    ]
    fp = result["rows"][0]
    # Filled with random keys and values, not a prefill: exactly 80 float32 tokens per layer in the fp cache.
    assert fp["cache_bytes@80"] == 2 * 2 * 2 * 80 * 32 * 4
    assert all(row["tokens_per_s@80"] > 0 for row in result["rows"])
    assert "random fill s @80" in out.with_suffix(".md").read_text()


def test_shaped_model_has_the_shape_and_refuses_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(synthetic.MODEL_SHAPES, "tiny", TINY_SHAPE)
    model = synthetic.shaped_model("tiny")
    shape = cache_shape(model.config)
    assert (shape.layers, shape.attention_heads, shape.kv_heads, shape.head_dim) == (2, 4, 2, 32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ConfigError, match=r"llama-3\.2-1b"):
        synthetic.shaped_model("gpt-17")


def test_llama_1b_shape_is_llama_3_2_1b() -> None:
    """The shape the issue's long-context targets name: 16 layers, 32 query heads, 8 KV heads of 64 dims."""
    shape = synthetic.MODEL_SHAPES["llama-3.2-1b"]
    assert (shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"]) == (16, 32, 8)
    assert shape["head_dim"] == shape["hidden_size"] // shape["num_attention_heads"] == 64
