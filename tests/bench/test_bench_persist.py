"""`kvpack bench persist` end to end on a tiny local model: every row measured, loads exact, report written.

(Named apart from tests/cache/test_persist.py: the test directories are not packages, so basenames must differ.)"""

from __future__ import annotations

import json
from pathlib import Path

from kvpack import cli


def test_bench_persist_writes_a_row_per_prefix_and_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    out = tmp_path / "persist.json"
    argv = [
        "bench", "persist", "--caches", "k4v4-plain-g16-r16,k8v8-g16-r16", "--contexts", "64,200", "--suffix", "4",
        "--prefill-repeats", "2", "--repeats", "3", "--data", str(data), "--model", str(tiny_model_dir), "--threads",
        "1", "--tmp", str(tmp_path), "--json", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "persist" and result["contexts"] == [64, 200] and result["suffix_tokens"] == 4
    assert [(row["context"], row["cache"]) for row in result["rows"]] == [
        (c, name) for c in (64, 200) for name in ("fp16 dump (DynamicCache)", "k4v4-plain-g16-r16", "k8v8-g16-r16")
    ]
    for row in result["rows"]:
        assert row["file_bytes"] > 0 and row["prefill_s"] > 0 and row["load_s"] > 0
        if row["cache"].startswith("k"):
            assert row["identical_first_token_logits"] is True
            assert row["load_first_token_s"] >= row["load_s"] and row["speedup_first_token"] > 0
        assert (row["prefill_runs"], row["prefill_first_token_runs"], row["load_runs"]) == (2, 2, 3)
        assert row["prefill_s"] <= row["prefill_median_s"] and row["load_s"] <= row["load_median_s"]
        assert row["prefill_cpu_s"] > 0 and row["load_vs_prefill"] == row["prefill_s"] / row["load_s"]
    k4_at_200 = next(r for r in result["rows"] if r["context"] == 200 and r["cache"] == "k4v4-plain-g16-r16")
    assert k4_at_200["size_vs_fp16_dump"] > 1  # 4-bit codes beat float16 once most tokens are packed
    assert not list(tmp_path.glob("tmp*/*"))  # the files went with their temporary directory
    page = out.with_suffix(".md").read_text()
    assert "| 200 | k4v4-plain-g16-r16 |" in page and "load s (cold)" in page and "| yes |" in page
