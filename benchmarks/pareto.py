"""Quality vs bits: merge `kvpack compare` results (kvpack configs and peers, each run with its own fp reference on
the same text) into one table and a Pareto plot of ΔPPL and mean KL against stored bits per value.

Runs older than the spec-grammar switch (2026-11-23 23:00 UTC) are read in the older grammar and their kvpack rows
renamed to today's canonical specs (`k4v4-g64-r128` then is `k4v4-plain-g64-r128` now).

Bits per value count codes and per-group metadata, not the full-precision windows (residual, sinks) that every
cache here keeps: kvpack's from its config (fp16 scale and zero per group, outlier bytes, per-layer bits averaged);
the peers' from their format: transformers' quantized caches store a float32 scale and shift per group of 64 in
this float32 model, `nbits + 64 / 64` (checked against their measured bytes: 29,491,200 B for quanto-int4 at 4096
tokens in `compare.json` is 5.0 bits for each of its 47,185,920 values).

    python benchmarks/pareto.py /tmp/peers.json /tmp/kvpack.json --out benchmarks/results/pareto
    python benchmarks/pareto.py benchmarks/results/pareto.json /tmp/more.json   # add runs to the committed merge
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from kvpack.config import as_config
from kvpack.harness.caches import parse_cache_name
from kvpack.profile import is_profile_path

# Runs made before this date wrote spec strings in the older grammar, where a spec meant exactly the options it
# wrote (`k4v4-g64-r128` was plain KIVI; see benchmarks/results/README.md).
GRAMMAR_SWITCH = "2026-11-23T23:00:00+00:00"


def current_name(name: str, run_date: str) -> str:
    """The name of a compare row in today's grammar: a kvpack spec of an older run is read with `-plain`."""
    if "@" in name or name.startswith(("profile:", "auto-")) or is_profile_path(name):  # named by what was typed
        return name
    if parse_cache_name(name).kind != "kvpack":
        return name
    if run_date >= GRAMMAR_SWITCH:
        return as_config(name).spec  # canonical today
    head, _, rest = name.partition("-")
    return as_config("-".join(p for p in (head, "plain", rest) if p)).spec


def merged_runs(paths: list[Path]) -> tuple[list[dict[str, Any]], float]:
    """The runs of `kvpack compare` results (or of earlier merges) and their common fp PPL; exits when they were
    measured on different texts or models, or their fp references differ (then they are not one measurement)."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text())
        runs.extend(data.get("runs", [data]))
    if not runs:
        raise SystemExit("no runs given")
    first = runs[0]
    if any(run["data"] != first["data"] or run["model"] != first["model"] for run in runs):
        raise SystemExit("the results were measured on different texts or models; they cannot share a table")
    fp_ppl = [row["ppl"] for run in runs for row in run["rows"] if row["cache"] == "fp"]
    if not fp_ppl or max(fp_ppl) - min(fp_ppl) > 1e-6 * fp_ppl[0]:
        raise SystemExit(f"the runs' fp references differ or are missing ({fp_ppl}): not the same measurement")
    return runs, fp_ppl[0]


def bits_of(row: dict[str, Any]) -> float | None:
    """Stored bits per value of a compare row (None for the fp reference)."""
    if row.get("bits_per_value") is not None:
        return float(row["bits_per_value"])
    spec = parse_cache_name(row["cache"])
    if spec.kind == "kvpack":
        return spec.bits_per_value()
    if spec.kind == "peer":
        assert spec.peer is not None
        return spec.peer["nbits"] + 2 * 32 / spec.peer["q_group_size"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "results", nargs="+", type=Path, help="kvpack compare JSON files (same text and model), or earlier merges"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto"), help="path stem (.md/.png)")
    args = parser.parse_args()
    runs, fp_ppl = merged_runs(args.results)
    first = runs[0]
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        for row in run["rows"]:
            name = current_name(row["cache"], run["date"])
            rows.setdefault(name, {**row, "cache": name})
    table = []
    for name, row in rows.items():
        bits = bits_of(row)
        if bits is None:
            continue
        kind = "kvpack" if row.get("profile") else parse_cache_name(row["cache"]).kind  # (a profile: kvpack's)
        table.append((name, "kvpack" if kind == "kvpack" else "peer", bits, row))
    table.sort(key=lambda t: (-t[2], t[3]["delta_ppl_pct"]))
    data = first["data"]
    lines = [
        f"# Quality vs bits per value: {first['model']} ({first['dtype']})",
        "",
        f"- merged from: {', '.join(str(p) for p in args.results)}",
        *(f"- run {i + 1}: {run['date']}, `{run['command']}`" for i, run in enumerate(runs)),
        f"- data: {data}",
        f"- machine: {first['machine']}; versions: {first['versions']}",
        f"- fp reference PPL {fp_ppl:.3f} (identical in every run)",
        "- bits per value: codes + per-group metadata (see benchmarks/pareto.py); full-precision windows excluded",
        "- kvpack rows are named by today's canonical specs (every option written out); the commands above are as "
        "typed then, in the spec grammar of their date (benchmarks/results/README.md)",
        "",
        "| cache | kind | bits/value | PPL | ΔPPL | mean KL | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, kind, bits, row in table:
        lines.append(
            f"| {name} | {kind} | {bits:.3f} | {row['ppl']:.3f} | {row['delta_ppl_pct']:+.2f}% | "
            f"{row['mean_kl']:.5f} | {100 * row['top1_agreement']:.2f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    combined = {"runs": runs, "table": [{"cache": n, "kind": k, "bits_per_value": b} for n, k, b, _ in table]}
    args.out.with_suffix(".json").write_text(json.dumps(combined, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "delta_ppl_pct", "ΔPPL vs fp (%)"), (axes[1], "mean_kl", "mean KL vs fp")):
        for kind, marker, colour in (("kvpack", "o", "tab:blue"), ("peer", "s", "tab:red")):
            points = [(b, r[key], n) for n, k, b, r in table if k == kind]
            if not points:
                continue
            ax.scatter(
                [p[0] for p in points], [max(p[1], 1e-4) for p in points], marker=marker, color=colour, label=kind
            )
            for b, value, name in points:
                short = re.sub(r"-l\d+$", "-l<per-layer>", name)  # a profile's two digits per layer
                ax.annotate(short, (b, max(value, 1e-4)), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per value (codes + metadata)")
        ax.set_ylabel(label + " (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{first['model']}: quality vs bits, {math.floor(rows['fp']['predictions']) + 1} tokens streamed")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
