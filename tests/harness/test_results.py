"""What every measuring tool shares (kvpack.harness.results): tables, byte sizes, comma lists, provenance, options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kvpack.attention import cpu
from kvpack.errors import ConfigError
from kvpack.harness.results import (
    GIB,
    MIB,
    add_model_options,
    command_line,
    format_bytes,
    markdown_table,
    parse_float_list,
    parse_int_list,
    parse_list,
    provenance,
    provenance_lines,
    publish,
    timed,
)


def test_markdown_table_has_a_rule_and_right_aligns_on_request() -> None:
    assert markdown_table(["cache", "bytes"], [["fp", 1024], ["k4v4", "3,000"]]) == [
        "| cache | bytes |",
        "|---|---|",
        "| fp | 1024 |",
        "| k4v4 | 3,000 |",
    ]
    assert markdown_table(["a", "b", "c"], [], align="lr")[1] == "|---|---:|---|"


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (3 * MIB, "3.0 MiB"), (1.25 * GIB, "1.25 GiB"), (None, "n/a")],
)
def test_bytes_are_printed_in_binary_units(n: float | None, text: str) -> None:
    assert format_bytes(n) == text


def test_lists_are_stripped_deduplicated_and_checked() -> None:
    assert parse_list(" fp, k4v4,,fp ", "--caches") == ["fp", "k4v4"]
    assert parse_list(["fp", "int8"], "--weights", choices=("fp", "int8")) == ["fp", "int8"]
    assert parse_list("", "--backends", allow_empty=True) == []
    assert parse_int_list("1024, 4096", "--contexts") == [1024, 4096]
    assert parse_int_list("", "--contexts", allow_empty=True) == []
    assert parse_float_list("0.1,1", "--depths") == [0.1, 1.0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_list(",", "--caches"), "--caches ',': give at least one value"),
        (lambda: parse_list("fp,int3", "--weights", choices=("fp", "int8")), "int3 unknown; use one or more of fp"),
        (lambda: parse_int_list("1024,abc", "--lengths"), "--lengths '1024,abc': give comma-separated integers"),
        (lambda: parse_int_list("0,8", "--batch"), "integers of at least 1"),
        (lambda: parse_float_list("0.5,1.2", "--depths"), "numbers of at least 0 and of at most 1"),
        (lambda: parse_float_list("half", "--depths"), "--depths 'half'"),
    ],
)
def test_bad_lists_are_config_errors_naming_the_option(call, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        call()


def test_command_line_spells_every_option() -> None:
    options = {"caches": "fp,k4v4", "prompt_tokens": 256, "chat": True, "sample": False, "model": None}
    assert command_line("bench threads", options) == "kvpack bench threads --caches fp,k4v4 --prompt-tokens 256 --chat"


def test_model_options_keep_each_command_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_model_options(parser, threads_default=2)
    args = parser.parse_args([])
    assert (args.model, args.dtype, args.device, args.threads) == (None, "float32", "cpu", 2)
    parser = argparse.ArgumentParser()
    add_model_options(parser, threads_default=1, device=False, threads_flag="--torch-threads")
    args = parser.parse_args(["--torch-threads", "3"])
    assert args.threads == 3 and not hasattr(args, "device")
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float64"])


def test_provenance_and_publish(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = {**provenance("test", command="kvpack test --x 1"), "value": 1}
    assert set(result["versions"]) >= {"kvpack", "torch", "transformers", "python"}
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch_threads"] >= 1
    lines = provenance_lines(result)
    assert lines[2] == "- command: `kvpack test --x 1`" and "torch thread(s), cpu" in lines[0]
    assert result["machine"]["cpu"] == " ".join([cpu.cpu_model(), *cpu.cpu_simd()]).strip()
    assert f"{result['machine']['cpu']}, " in lines[0] or not result["machine"]["cpu"]  # the CPU is named

    def page(r: dict) -> str:
        return f"# value {r['value']}\n"

    def plot(r: dict, path: Path) -> None:
        path.write_bytes(b"png")

    publish(result, tmp_path / "out" / "r.json", page, plot)
    assert json.loads((tmp_path / "out" / "r.json").read_text())["value"] == 1
    assert (tmp_path / "out" / "r.md").read_text() == "# value 1\n" and (tmp_path / "out" / "r.png").is_file()
    captured = capsys.readouterr()
    assert captured.out.startswith("# value 1") and "r.json" in captured.err and "r.png" in captured.err


def test_timed_returns_the_value_and_the_seconds() -> None:
    value, seconds = timed(sorted, [3, 1, 2], reverse=True)
    assert value == [3, 2, 1] and 0 <= seconds < 10
