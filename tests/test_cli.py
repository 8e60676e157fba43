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
    assert "backend cpu:" in out and "backend numba:" in out and "backend triton:" in out
    assert any(
        line.startswith("auto picks: ") and line.split()[2] in ("cpu", "numba", "torch") for line in out.splitlines()
    )


# Run in a fresh interpreter: records which file first imports each heavy package, then imports kvpack.
IMPORT_WATCH = """
import importlib.util, sys, traceback
from pathlib import Path

kvpack_dir = str(Path(importlib.util.find_spec("kvpack").origin).parent)
importers = {}


class Watch:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ("matplotlib", "triton") and top not in importers:
            files = [frame.filename for frame in traceback.extract_stack()[:-1] if not frame.filename.startswith("<")]
            importers[top] = files[-1] if files else ""
        return None


sys.meta_path.insert(0, Watch())
import kvpack

own = [name for name in ("kvpack.cli", "kvpack.models", "kvpack.attention.triton_kernels") if name in sys.modules]
print(sorted(own + [name for name, importer in importers.items() if importer.startswith(kvpack_dir)]))
"""


def test_import_stays_light() -> None:
    """Importing kvpack imports none of its heavy dependencies itself. Libraries it imports may: with hqq installed,
    transformers imports it, whose `torch.compile` imports torch._dynamo, which imports triton when installed."""
    result = subprocess.run([sys.executable, "-c", IMPORT_WATCH], capture_output=True, text=True, timeout=120)
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
