"""`kvpack bench threads` end to end on a tiny local model: every thread identical to its sequential run, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpack import cli


def test_bench_threads_reports_identical_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "threads.json"
    argv = ["bench", "threads", "--caches", "k4v4-g16-r16,k8v8-g16-r16@dense", "--workers", "3", "--rounds", "1"]
    argv += ["--tokens", "8", "--prompt-tokens", "40", "--model", str(tiny_model_dir), "--json", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["prompt_tokens"] == [40, 57, 74]
    assert [row["cache"] for row in result["rows"]] == ["k4v4-g16-r16", "k8v8-g16-r16@dense"]
    assert all(row["identical"] and len(row["concurrent_s"]) == 1 for row in result["rows"])
    assert all(min(row["packed_tokens"]) > 0 for row in result["rows"])  # every thread ran on packed data
    assert "| k4v4-g16-r16 | yes |" in out.with_suffix(".md").read_text()


def test_bad_spec_fails_before_loading_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "threads", "--caches", "k4v4,k5v5", "--model", str(tmp_path / "no-such-model")]
    assert cli.main([*argv, "--json", str(tmp_path / "t.json")]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err
