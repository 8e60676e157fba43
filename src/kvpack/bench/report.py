"""`kvpack report results.json`: Markdown tables and PNG plots made from a compare result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvpack.bench.compare import row_key
from kvpack.harness.results import figure, format_bytes, markdown_page, markdown_table, plot_lines


def _fmt(value: Any, pattern: str) -> str:
    return "" if value is None else format(value, pattern)


def _key(row: dict[str, Any]) -> str:
    return row_key(row.get("weights", "fp"), row["cache"])


def _is_reference(row: dict[str, Any]) -> bool:
    return _key(row) == "fp"


def markdown(result: dict[str, Any]) -> str:
    """The compare result as a Markdown page: setup, then one table (a weights section when weights vary)."""
    contexts = result.get("contexts", [])
    with_weights = any(row.get("weights", "fp") != "fp" for row in result["rows"])
    data = result["data"]
    header = ["cache", "PPL", "ΔPPL", "mean KL", "top-1", "worst KL (pos)"]
    if with_weights:
        header = ["weights", *header[:3], "ΔPPL vs fp weights", *header[3:]]
    for context in contexts:
        header += [f"bytes @{context}", f"vs fp16 @{context}", f"tok/s @{context}", f"vs fp @{context}"]
        if with_weights:
            header.append(f"weights + cache @{context}")
    rows = []
    for row in result["rows"]:
        cells = [
            row["cache"],
            _fmt(row["ppl"], ".3f"),
            "—" if _is_reference(row) else f"{row['delta_ppl_pct']:+.2f}%",
            _fmt(row.get("mean_kl"), ".5f"),
            "" if row.get("top1_agreement") is None else f"{row['top1_agreement']:.2%}",
            "" if row.get("max_kl") is None else f"{row['max_kl']:.3f} ({row['worst_position']})",
        ]
        if with_weights:
            vs_fp_weights = row.get("delta_ppl_vs_fp_weights_pct")
            weights = f"{row['weights']} ({format_bytes(row['weight_bytes'])})"
            cells = [weights, *cells[:3], "—" if vs_fp_weights is None else f"{vs_fp_weights:+.2f}%", *cells[3:]]
        for context in contexts:
            cells += [
                f"{row[f'cache_bytes@{context}']:,}",
                f"{row[f'vs_fp16@{context}']:.2f}x",
                f"{row[f'tokens_per_s@{context}']:.2f}",
                f"{row[f'speed_vs_fp@{context}']:.2f}x",
            ]
            if with_weights:
                cells.append(format_bytes(row[f"total_bytes@{context}"]))
        rows.append(cells)
    setup = [
        f"- data: {Path(data['path']).name} (sha256 {data['sha256'][:12]}…), first {data['tokens']} tokens, "
        f"{data['mode']} one token at a time"
    ]
    earlier = {row["measured"] for row in result["rows"] if "measured" in row}
    if earlier:
        kept = ", ".join(row["cache"] for row in result["rows"] if "measured" in row)
        setup.append(f"- resumed: {kept} measured on {', '.join(sorted(earlier))} (same model, text and settings)")
    lines = markdown_table(header, rows)
    notes = dict.fromkeys((row["cache"], note) for row in result["rows"] for note in row.get("notes", []))
    if notes:
        lines += ["", "Notes:"] + [f"- {cache}: {note}" for cache, note in notes]
    return markdown_page(f"kvpack compare: {result['model']} ({result['dtype']})", result, setup, lines)


def tokens_per_s_lines(result: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """Decode tokens/s vs context of each row of a compare or decode result, by row name (`plot_lines`' input)."""
    contexts = result.get("contexts", [])
    return {_key(row): (contexts, [row[f"tokens_per_s@{c}"] for c in contexts]) for row in result["rows"]}


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: quality (mean KL) vs bits per cached value, and decode tokens/s vs context."""
    contexts = result.get("contexts", [])
    fp_row = next(row for row in result["rows"] if _is_reference(row))
    element_bits = 32 if result["dtype"] == "float32" else 16
    last = contexts[-1] if contexts else None
    title = f"{result['model']}: {result['data']['tokens']} streamed tokens, {result['date'][:10]}"
    with figure(path, title) as (left, right):
        for row in result["rows"]:
            if _is_reference(row) or last is None or row.get("mean_kl") is None:
                continue
            bits = element_bits * row[f"cache_bytes@{last}"] / fp_row[f"cache_bytes@{last}"]
            left.scatter(bits, max(row["mean_kl"], 1e-6))
            left.annotate(_key(row), (bits, max(row["mean_kl"], 1e-6)), fontsize=8)
        left.set_xlabel(f"bits per cached value at {last} tokens (all bytes held)")
        left.set_ylabel("mean KL vs full-precision cache")
        left.set_yscale("log")
        left.grid(alpha=0.3)
        plot_lines(right, tokens_per_s_lines(result), "context (tokens)", "decode tokens/s")


def write_report(json_path: Path) -> tuple[Path, Path]:
    """Write `<name>.md` and `<name>.png` next to `json_path`; returns their paths."""
    result = json.loads(Path(json_path).read_text())
    md_path, png_path = Path(json_path).with_suffix(".md"), Path(json_path).with_suffix(".png")
    md_path.write_text(markdown(result))
    plot(result, png_path)
    return md_path, png_path
