"""`kvpack bench long`, the short version for CI: 1,024 generated tokens, the byte checks exact, nothing left alive.

The committed 16k-token result is `benchmarks/results/long_run.md`, made by `kvpack bench long`.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from kvpack import cli
from kvpack.bench.long_run import generate_long, tiny_llama
from kvpack.cache.layer import PackedLayer
from kvpack.cache.plan import packed_bytes
from kvpack.cache.storage import GROWTH_TOKENS
from kvpack.config import parse_spec

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPEC = "k4v4-g16-r16"


def test_cache_grows_by_exactly_the_formula_and_capacity_stays_bounded(tmp_path: Path) -> None:
    out = tmp_path / "long.json"
    argv = [
        "bench", "long", "--tokens", "1024", "--prompt", "40", "--spec", SPEC, "--runs", "2", "--sample-every", "64",
        "--warmup", "256", "--layers", "2", "--kv-heads", "2", "--head-dim", "32", "--json", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    config = parse_spec(SPEC)
    rows, head_dim = 2 * 2, 32  # layers x KV heads at batch 1
    per_token = rows * (packed_bytes(config.key, 16, head_dim) + packed_bytes(config.value, 16, head_dim)) / 16
    # The residual and sink buffers (keys and values, float32): the held bytes that do not grow.
    fixed = rows * 2 * (config.residual + config.block_tokens + config.sinks) * head_dim * 4
    for run in result["runs"]:
        summary = run["summary"]
        assert summary["packed_bytes_equal_formula"] and summary["packed_tokens_as_expected"]
        assert summary["formula_bytes_per_token"] == per_token
        assert summary["packed_slope_bytes_per_token"] == pytest.approx(per_token, rel=1e-9)  # exactly linear
        for sample in run["samples"]:
            assert sample["cached_tokens"] == 40 + sample["new_tokens"]  # each decode step caches one token
            unused = sample["held_bytes"] - sample["packed_bytes"] - fixed
            growth = max(GROWTH_TOKENS, sample["packed_tokens"] // 8)
            assert 0 <= unused <= growth * per_token, sample
    assert [len(run["samples"]) for run in result["runs"]] == [16, 16]
    page = out.with_suffix(".md").read_text()
    assert "| 2 |" in page and "Checks: all passed." in page


def _live_kvpack_objects() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    return sum(isinstance(o, PackedLayer) for o in objects), sum(isinstance(o, torch.Tensor) for o in objects)


def test_a_finished_run_leaves_no_cache_or_tensor_alive() -> None:
    model = tiny_llama(1024, layers=2, kv_heads=2, head_dim=32)
    generate_long(model, SPEC, "auto", tokens=64, prompt=40, sample_every=64)  # warm: lazy per-process state
    layers_before, tensors_before = _live_kvpack_objects()
    run = generate_long(model, SPEC, "auto", tokens=300, prompt=40, sample_every=100)
    assert run["samples"][-1]["packed_tokens"] > 0
    assert _live_kvpack_objects() == (layers_before, tensors_before) == (0, tensors_before)
