"""`kvpack bench decode` end to end on a tiny local model: every cache and kernel measured, report written."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpack import cli
from kvpack.attention.registry import kvpack_attention
from kvpack.bench.decode import read_bandwidth


def test_bench_decode_writes_rows_for_every_cache_and_kernel(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    caches = "k4v4-plain-g16-r16,fp-prealloc,k4v4-plain-g16-r16@dense,k2v2-plain-g16-r16@torch"
    argv = [
        "bench", "decode", "--caches", caches, "--contexts", "48,96", "--steps", "2", "--backends", "torch,cpu",
        "--spec", "k4v4-plain-g16-r16", "--layers", "2", "--calls", "2", "--model", str(tiny_model_dir), "--threads",
        "1", "--json", str(out), "--profile-steps", "2",
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
    assert kernels == {
        (c, k)
        for c in (48, 96)
        for k in ("kvpack k4v4-plain-g16-r16 (torch)", "kvpack k4v4-plain-g16-r16 (cpu)", "fp32 SDPA")
    }
    page = out.with_suffix(".md").read_text()
    assert "| fp-prealloc |" in page and "% of read bandwidth" in page and "Bound on any cache's speedup" in page
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_read_bandwidth_is_positive() -> None:
    measured = read_bandwidth(n_bytes=1 << 22, repeats=2)
    assert measured["read_gb_s"] > 0 and measured["copy_gb_s"] > 0
