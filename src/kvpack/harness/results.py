"""What every measuring tool records and prints, written once: provenance, JSON, Markdown tables, byte sizes, comma
lists, timings, and the command-line options shared by the tools that load a model.

JSON is the source of truth; Markdown (and plots) are made from it (`publish`). Nothing here imports torch or
transformers at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvpack.errors import ConfigError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PEER_PACKAGES = ("optimum-quanto", "hqq", "tqai")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
T = TypeVar("T")


def versions() -> dict[str, str]:
    """Versions of kvpack, torch, transformers, Python and the installed peer packages (their numbers move with them);
    peers are read without importing them."""
    from importlib import metadata

    import torch
    import transformers

    from kvpack.version import __version__

    found = {
        "kvpack": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for package in PEER_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def provenance(
    benchmark: str,
    model: Any = None,
    model_name: str | None = None,
    *,
    command: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """What every result records first: the benchmark, command, date, machine and versions, then, given a loaded
    `model`, its name (`model_name`, default the embedded model's) and dtype.

    command: default the running `kvpack ...` command line. device: default the model's, else cpu."""
    import torch

    from kvpack.attention.cpu import cpu_model, cpu_simd
    from kvpack.models import DEFAULT_MODEL

    device = str(model.device) if model is not None and device is None else (device or "cpu")
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": " ".join([cpu_model(), *cpu_simd()]).strip(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        machine["device_name"] = torch.cuda.get_device_name(torch.device(device))
    header = {
        "benchmark": benchmark,
        "command": command or "kvpack " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
    }
    if model is not None:
        header.update(model=model_name or DEFAULT_MODEL, dtype=str(model.dtype).removeprefix("torch."))
    return header


def provenance_lines(result: dict[str, Any]) -> list[str]:
    """The Markdown bullets of a result's provenance: date and machine, versions, command."""
    machine = result["machine"]
    threads = machine.get("torch_threads", machine.get("threads"))  # "threads" in results before 2026-12
    return [
        f"- date: {result['date']}; machine: {machine['platform']}, "
        + (f"{machine['cpu']}, " if machine.get("cpu") else "")  # (results since 2026-12-07 name the CPU)
        + f"{threads} torch thread(s), {machine['device']}",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in result["versions"].items()),
        f"- command: `{result['command']}`",
    ]


def display_path(path: str | os.PathLike[str]) -> str:
    """`path` as results record it: relative to the working directory (the repo root, where the benchmarks run)
    when it is there or beside it (`../shared/data/...`), so no result carries the layout of the machine it ran on."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith(os.path.join(os.pardir, os.pardir)) else relative


def write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    """Write `data` as JSON (a trailing newline, the folder made if needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    return path


def publish(
    result: dict[str, Any],
    json_path: str | os.PathLike[str],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
    *,
    markdown_path: str | os.PathLike[str] | None = None,
    png_path: str | os.PathLike[str] | None = None,
    indent: int = 2,
) -> str:
    """Write the result as JSON, then its Markdown page (and `plot`'s PNG) made from it, by default beside the JSON
    (`.md`, `.png`); print the page, and the paths written to stderr. Returns the page."""
    written = [write_json(json_path, result, indent)]
    page = markdown(result)
    written.append(Path(markdown_path or written[0].with_suffix(".md")))
    written[-1].parent.mkdir(parents=True, exist_ok=True)
    written[-1].write_text(page, encoding="utf-8")
    if plot is not None:
        written.append(Path(png_path or written[0].with_suffix(".png")))
        written[-1].parent.mkdir(parents=True, exist_ok=True)
        plot(result, written[-1])
    print(page)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return page


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """The lines of a Markdown table: header, rule, one line per row (cells formatted with `str`).

    align: one letter per column, `r` to right-align it (columns beyond the string, or `l`, keep the default)."""
    rule = "".join("---:|" if align[i : i + 1] == "r" else "---|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def markdown_page(title: str, result: dict[str, Any], notes: Sequence[str], body: Sequence[str]) -> str:
    """A result's Markdown page: `# title`, its provenance bullets and then `notes` (more bullets), a blank line, and
    `body`'s lines; ends with a newline."""
    return "\n".join([f"# {title}", "", *provenance_lines(result), *notes, "", *body]) + "\n"


@contextlib.contextmanager
def figure(path: str | os.PathLike[str], title: str, panels: int = 2) -> Iterator[list[Any]]:
    """Yield `panels` matplotlib Axes side by side to draw on; then title the figure and save it as a PNG at `path`.

    A bare `Figure` (no pyplot): no global backend state, and importing kvpack never imports matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    yield list(fig.subplots(1, panels, squeeze=False)[0])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_lines(
    axes: Any, lines: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str
) -> None:
    """One marked line per `label: (xs, ys)` of `lines` on `axes`, with axis labels, a legend and a light grid."""
    for label, (xs, ys) in lines.items():
        axes.plot(xs, ys, marker="o", label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """`fn(*args, **kwargs)` and the wall-clock seconds it took."""
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def format_bytes(n: float | None) -> str:
    """A byte count in binary units, as reports print it: `512 B`, `1.5 KiB`, `11.3 MiB`, `1.25 GiB` (`n/a` for
    None)."""
    if n is None:
        return "n/a"
    for unit, size, digits in (("GiB", GIB, 2), ("MiB", MIB, 1), ("KiB", KIB, 1)):
        if abs(n) >= size:
            return f"{n / size:,.{digits}f} {unit}"
    return f"{n:,.0f} B"


def parse_list(
    text: str | Sequence[Any], option: str, *, choices: Sequence[str] | None = None, allow_empty: bool = False
) -> list[str]:
    """Comma-separated names (`"fp, k4v4,"` -> `["fp", "k4v4"]`), stripped, blanks dropped, repeats kept once.

    A sequence is taken item by item. option: the flag named in errors (e.g. `--caches`). Raises ConfigError when
    nothing is left (unless `allow_empty`) or a name is not among `choices`."""
    parts = text.split(",") if isinstance(text, str) else [str(part) for part in text]
    names = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if choices is not None and (bad := [name for name in names if name not in choices]):
        raise ConfigError(f"{option} {text!r}: {', '.join(bad)} unknown; use one or more of {', '.join(choices)}.")
    if not names and not allow_empty:
        raise ConfigError(f"{option} {text!r}: give at least one value (comma-separated).")
    return names


def _numbers(
    text: str | Sequence[Any], option: str, kind: type, minimum: float | None, maximum: float | None, allow_empty: bool
) -> list[Any]:
    names = parse_list(text, option, allow_empty=allow_empty)
    try:
        values = [kind(name) for name in names]
    except ValueError:
        values = []
    low, high = -math.inf if minimum is None else minimum, math.inf if maximum is None else maximum
    if len(values) != len(names) or any(not low <= value <= high for value in values):
        what = "integers" if kind is int else "numbers"
        bounds = f" of at least {minimum:g}" if minimum is not None else ""
        bounds += f"{' and' if bounds else ''} of at most {maximum:g}" if maximum is not None else ""
        example = "1024,4096" if kind is int else "0.1,0.5,0.9"
        raise ConfigError(f"{option} {text!r}: give comma-separated {what}{bounds}, e.g. {example}.")
    return values


def parse_int_list(
    text: str | Sequence[Any], option: str, *, minimum: int | None = 1, allow_empty: bool = False
) -> list[int]:
    """Comma-separated integers of at least `minimum` (`"1024,4096"` -> `[1024, 4096]`), in the order given.

    Raises ConfigError naming `option` for a part that is not an integer or is below `minimum`, or when nothing is
    given (unless `allow_empty`)."""
    return _numbers(text, option, int, minimum, None, allow_empty)


def parse_float_list(
    text: str | Sequence[Any], option: str, *, minimum: float | None = 0.0, maximum: float | None = 1.0
) -> list[float]:
    """Comma-separated numbers within [`minimum`, `maximum`] (default fractions: [0, 1]), in the order given; raises
    ConfigError as `parse_int_list` does."""
    return _numbers(text, option, float, minimum, maximum, False)


def command_line(name: str, options: dict[str, Any]) -> str:
    """`kvpack <name> --option value ...`: the command that reproduces a run, every option spelled out (`_` in a name
    becomes `-`; True gives the bare flag; None and False are left out)."""
    parts = [f"kvpack {name}"]
    for option, value in options.items():
        if value is not None and value is not False:
            flag = "--" + option.replace("_", "-")
            parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def add_model_options(
    parser: argparse.ArgumentParser, threads_default: int = 0, *, device: bool = True, threads_flag: str = "--threads"
) -> None:
    """Declare `--model`, `--dtype`, `--device` (unless not `device`) and `--threads` (named `threads_flag`, stored
    as `threads`; 0: torch's choice). `kvpack.cli.main` applies `threads` before any command runs."""
    threads = "torch's choice" if threads_default == 0 else threads_default
    model_help = "local dir, .gguf file or cached HF model id (default: embedded SmolLM2-135M)"
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    if device:
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument(
        threads_flag, dest="threads", type=int, default=threads_default, help=f"torch CPU threads (default {threads})"
    )
