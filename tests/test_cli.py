"""The command line: help, spec, generate (with the embedded model), prompt caches, errors."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help_and_a_description(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*name.split(), "--help"])
    assert exit_.value.code == 0
    text, _, handler = cli.COMMANDS[name]
    assert text and handler.__doc__ and f"kvpack {name}" in capsys.readouterr().out


def test_threads_apply_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls: list[int] = []
    assert cli.main(["bench", "threads", "--torch-threads", "3", "--caches", "k5v5"]) == 2  # fails after the threads
    assert calls == [3]


def test_spec_explains_and_bad_spec_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["spec", "k4v2-plain-s4"]) == 0
    out = capsys.readouterr().out
    assert "k4v2-plain-g64-r128-s4" in out and "4.5 bits per value" in out and "2.5 bits per value" in out
    assert cli.main(["spec", "k5v4"]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err


def test_size_ratios_say_larger_when_larger() -> None:
    """A short prompt's packed cache (its exact window preallocated) can be larger than a float16 cache: say so,
    instead of "0.13x smaller"."""
    assert cli._ratio(2000.0, 1000.0) == "2.00x smaller"
    assert cli._ratio(1000.0, 7690.0) == "7.69x larger"


def test_generate_without_prompt_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--cache", "k4v4-plain"]) == 2
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
    summary = next(line for line in out.splitlines() if line.startswith("[k4v4-g64-r128-s4-rotv]"))
    assert "new tokens" in summary and "tokens/s" in summary and "smaller than a float16 cache" in summary
    assert "1957" in out  # the document's answer
    assert "[check]" in out


# -- prompt caches: cache build / cache info / generate --prefix-cache --------------------------------------------

DOCUMENT = (
    "The lighthouse at Point Amour was built in 1857. Its keepers lit the lamp every evening, and in 1957 the light "
    "was converted to electricity. The tower is 33 metres tall, the second tallest in Canada."
)


@pytest.fixture
def tiny_prefix(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    out = tmp_path / "doc.kvpc"
    argv = ["cache", "build", "--model", str(tiny_model_dir), "--prompt-file", str(tmp_path / "doc.txt")]
    assert cli.main([*argv, "-o", str(out), "--cache", "k4v4-plain-g16-r16"]) == 0
    written = capsys.readouterr().out
    assert (
        # 76 tokens, most of them in the exact window in float32: the file is larger than a float16 cache, and says so
        f"wrote {out}: " in written and "k4v4-plain-g16-r16" in written and "larger than the float16 cache" in written
    )
    return out


def generate_argv(model_dir: Path, *args: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--backend", "torch", *args]


def test_a_window_beyond_the_context_is_a_clear_error(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for spec in ("k4v4-s999999", "k4v4-r999999"):
        assert cli.main(generate_argv(tiny_model_dir, "Hello there", "--cache", spec)) == 2
        err = capsys.readouterr().err
        assert "at most 512 tokens" in err and "Traceback" not in err


def test_cache_build_then_info(tiny_prefix: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cache", "info", str(tiny_prefix)]) == 0
    out = capsys.readouterr().out
    assert "kvpack prompt cache, schema 1" in out and "checksum ok" in out
    assert "k4v4-plain-g16-r16" in out and "LlamaForCausalLM (llama), float32, 2 layers (2 full)" in out
    assert "prefill:" in out
    assert cli.main(["cache", "info", "--json", str(tiny_prefix)]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["format"] == "kvpack.prompt-cache" and header["nbytes"] == tiny_prefix.stat().st_size
    assert len(header["token_ids"][0]) > 40


def test_generate_from_a_prefix_cache_matches_a_fresh_prefill(
    tiny_model_dir: Path, tiny_prefix: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = generate_argv(tiny_model_dir, "--prefix-cache", str(tiny_prefix), "When was the light electrified?")
    assert cli.main([*argv, "--check"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"Loaded a \d+-token prefix in [\d.]+ s; its prefill took [\d.]+ s when built", captured.err)
    assert re.search(r"loaded from doc\.kvpc in [\d.]+ s", captured.out)
    assert re.search(
        r"\[check\] a fresh k4v4-plain-g16-r16 prefill of the [\d,]+-token prefix took .* identical", captured.out
    )


def test_prompt_file_must_continue_the_cached_prefix(
    tiny_model_dir: Path, tiny_prefix: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = generate_argv(tiny_model_dir, "--prefix-cache", str(tiny_prefix), "When?")
    assert cli.main([*argv, "--prompt-file", str(tmp_path / "doc.txt"), "--check"]) == 0
    assert "identical" in capsys.readouterr().out
    (tmp_path / "other.txt").write_text(DOCUMENT.replace("1857", "1858"))
    assert cli.main([*argv, "--prompt-file", str(tmp_path / "other.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not continue the cached prefix" in err and "differ at token" in err and "prompt: '8." in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache", "k8v8-g16-r16"], "differs from the prefix cache's k4v4-plain-g16-r16"),
        (["--cache", "k9v9"], "bits=9 is not supported"),
        (["--no-chat"], ""),  # a raw question after a chat prefix is allowed (the caller's choice)
    ],
)
def test_prefix_cache_options_are_checked(
    tiny_model_dir: Path, tiny_prefix: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main([*generate_argv(tiny_model_dir, "--prefix-cache", str(tiny_prefix), "When?"), *extra])
    assert code == (2 if message else 0)
    assert message in capsys.readouterr().err


def test_prefix_cache_errors_come_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--prefix-cache", str(tmp_path / "none.kvpc"), "When?"]) == 2
    assert "does not exist; make one with `kvpack cache build`" in capsys.readouterr().err
    (tmp_path / "x.kvpc").write_bytes(b"")
    assert cli.main(["generate", "--prefix-cache", str(tmp_path / "x.kvpc")]) == 2
    assert "give a prompt to append after the cached prefix" in capsys.readouterr().err
    assert cli.main(["cache", "info", str(tmp_path / "x.kvpc")]) == 2
    assert "is truncated" in capsys.readouterr().err


def test_a_prefix_cache_of_another_model_is_refused(
    tiny_model_dir: Path, tiny_prefix: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "other")
    assert cli.main(generate_argv(tmp_path / "other", "--prefix-cache", str(tiny_prefix), "When?")) == 2
    err = capsys.readouterr().err
    assert "built for another model" in err and "layers/kv heads/head dim" in err


def test_a_raw_prefix_needs_no_chat(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "raw.kvpc"
    argv = ["cache", "build", "--model", str(tiny_model_dir), DOCUMENT, "-o", str(out), "--cache", "k4v4-plain-g16-r16"]
    assert cli.main([*argv, "--no-chat"]) == 0
    assert cli.main(generate_argv(tiny_model_dir, "--prefix-cache", str(out), "When?")) == 2
    assert "not built with the chat template" in capsys.readouterr().err
    assert cli.main([*generate_argv(tiny_model_dir, "--prefix-cache", str(out), "When?"), "--no-chat", "--check"]) == 0
    assert "identical" in capsys.readouterr().out


@pytest.mark.slow
def test_prefix_cache_on_the_default_model(
    default_model, monkeypatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvpack.models

    monkeypatch.setattr(kvpack.models, "load_model", lambda *args, **kwargs: default_model)
    out = tmp_path / "handbook.kvpc"
    assert cli.main(["cache", "build", "--prompt-file", str(ROOT / "examples" / "handbook.txt"), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    previous = default_model[0].config._attn_implementation
    question = "In what year was the light converted to electricity?"
    try:
        argv = ["generate", "--prefix-cache", str(out), question, "--max-new-tokens", "16", "--check"]
        assert cli.main(argv) == 0
    finally:
        default_model[0].set_attn_implementation(previous)
    text = capsys.readouterr().out
    assert "1957" in text.splitlines()[0]
    assert "generates identical tokens (16/16)" in text
