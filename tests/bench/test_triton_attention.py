"""`benchmarks/triton_attention.py --smoke`: the GPU benchmark of the triton backend runs and writes its result
(on a machine without a GPU, under Triton's interpreter: the script sets TRITON_INTERPRET itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_both_kernels_and_agrees_with_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "triton_attention.json"
    script = ROOT / "benchmarks" / "triton_attention.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    measured = json.loads(out.read_text())
    assert [row["kernel"] for row in measured["rows"]] == ["kvpack k4v4-g16-r16 (triton)", "fp16 SDPA"]
    assert all(row["us_per_call"] > 0 and row["bytes_read"] > 0 for row in measured["rows"])
    # 80 tokens of k4v4-g16-r16 (4 sinks): the sinks, 3 packed blocks of 16, 28 exact (the flush rule keeps >= 16)
    assert measured["packed_tokens"] == 48
    assert measured["max_abs_error_vs_reference"] <= measured["error_bound"]
