"""The command line: help, spec, generate (with the embedded model), errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvpack import cli

ROOT = Path(__file__).resolve().parents[1]


def run_kvpack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvpack", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_each_subcommand_with_one_line() -> None:
    result = run_kvpack("--help")
    assert result.returncode == 0
    for command in ("generate", "spec"):
        lines = [line for line in result.stdout.splitlines() if line.strip().startswith(command + " ")]
        assert len(lines) == 1 and len(lines[0].split()) > 3, result.stdout


def test_spec_explains_and_bad_spec_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["spec", "k4v2-s4"]) == 0
    out = capsys.readouterr().out
    assert "k4v2-g64-r128-s4" in out and "4.5 bits per value" in out and "2.5 bits per value" in out
    assert cli.main(["spec", "k5v4"]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err


def test_generate_without_prompt_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--cache", "k4v4"]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_unknown_weight_format_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "--weights", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert cli.main(["ppl", "--weights", "fp,int3", "--data", __file__]) == 2
    assert "use one or more of fp, int8, int4" in capsys.readouterr().err


def test_doctor_names_the_backend_auto_picks(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "backend cpu:" in out and "backend numba:" in out
    assert any(
        line.startswith("auto picks: ") and line.split()[2] in ("cpu", "numba", "torch") for line in out.splitlines()
    )


def test_import_stays_light() -> None:
    # transformers' cache module, which kvpack builds on, may itself load triton (through hqq and torch._dynamo,
    # when both are installed): what counts is what `import kvpack` adds beyond it.
    heavy = "('matplotlib', 'triton', 'kvpack.cli', 'kvpack.models')"
    code = (
        "import sys, transformers.cache_utils; before = set(sys.modules); import kvpack; "
        f"print(sorted(m for m in {heavy} if m in sys.modules and m not in before))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_generate_prints_text_and_summary(default_model, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    import kvpack.models

    monkeypatch.setattr(kvpack.models, "load_model", lambda *args, **kwargs: default_model)
    question = "In what year was the light converted to electricity?"
    argv = ["generate", "--prompt-file", str(ROOT / "examples" / "handbook.txt"), question, "--cache", "k4v4"]
    previous = default_model[0].config._attn_implementation
    try:
        assert cli.main([*argv, "--max-new-tokens", "24", "--check"]) == 0
    finally:
        default_model[0].set_attn_implementation(previous)  # generate switched it to kvpack's attention
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("[k4v4-g64-r128]"))
    assert "new tokens" in summary and "tokens/s" in summary and "smaller than a float16 cache" in summary
    assert "1957" in out  # the document's answer
    assert "[check]" in out
