"""Ablation of kvpack's quality options: each technique alone and combined, at 2, 3 and 4 bits, from `kvpack compare`
results on one text (every run with its own, identical, fp reference).

Rows are the options a cache uses on top of plain KIVI (sinks, rotation, codebook, clipping, outliers), columns the
bit widths of its keys and values (k2v2, k3v3, k4v4); each cell is ΔPPL vs fp and mean KL, with the stored bits
per value when the options add bytes (outliers). The configs it expects are written by `--print-caches`:

    kvpack compare --caches "$(python benchmarks/ablation.py --print-caches --bits 2)" --tokens 2048 --contexts "" \\
        --threads 1 --out /tmp/ablation_k2.json        # the same for --bits 3 and 4, then:
    python benchmarks/ablation.py /tmp/ablation_k*.json --out benchmarks/results/ablation
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pareto import merged_runs  # benchmarks/ is this script's folder

from kvpack.config import CacheConfig, as_config

# The option sets measured, in table order, as spec options after `k<b>v<b>-plain`.
OPTION_SETS = (
    "",
    "s4",
    "rot",
    "cb",
    "clip",
    "clipk",
    "o1",
    "s4-rotv",
    "s4-rotv-clipk",
    "s4-rot",
    "s4-rot-cb",
    "s4-rot-clip",
    "s4-rot-clipk",
    "s4-rot-o1",
    "s4-rot-cb-clip-o1",
)
WIDTHS = (2, 3, 4)


def spec_of(bits: int, options: str) -> str:
    return "-".join(part for part in (f"k{bits}v{bits}-plain", options) if part)


def options_of(config: CacheConfig) -> str:
    """The option set of `config` as written in `OPTION_SETS` (what its canonical spec adds to plain KIVI)."""
    parts = config.spec.split("-")[1:]
    return "-".join(p for p in parts if p != "plain" and not re.fullmatch(r"(g|gk|gv|r)\d+", p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="kvpack compare JSON files (same text and model)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation"), help="path stem (.md/.json)")
    parser.add_argument("--print-caches", action="store_true", help="print the caches to measure and exit")
    parser.add_argument("--bits", type=int, choices=WIDTHS, help="with --print-caches: one bit width only")
    args = parser.parse_args()
    if args.print_caches:
        widths = (args.bits,) if args.bits else WIDTHS
        print(",".join(spec_of(b, o) for b in widths for o in OPTION_SETS))
        return
    if not args.results:
        raise SystemExit("give the compare JSON files to tabulate (or --print-caches)")
    runs, fp_ppl = merged_runs(args.results)
    first = runs[0]
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        for row in run["rows"]:
            if row["cache"] == "fp":
                continue
            config = as_config(row["cache"])
            if config.key.bits == config.value.bits and config.key.bits in WIDTHS and not config.layer_bits:
                cells[(options_of(config), config.key.bits)] = {**row, "bits_per_value": config.bits_per_value}
    names = {"s4": "4 sinks", "rot": "rotation", "cb": "codebook", "clip": "clipping", "clipk": "clipping (keys)"}
    lines = [
        f"# Ablation: {first['model']} ({first['dtype']}), {first['data']['tokens']} tokens streamed",
        "",
        *(f"- run {i + 1}: {run['date']}, `{run['command']}`" for i, run in enumerate(runs)),
        f"- data: {first['data']}",
        f"- machine: {first['machine']}; versions: {first['versions']}",
        f"- fp reference PPL {fp_ppl:.3f} (identical in every run)",
        "- each cell: ΔPPL vs fp / mean KL; every config is `k<b>v<b>-plain-<options>` (groups of 64, residual 128)",
        "- options: s4 = 4 full-precision sink tokens, rot = randomized Hadamard rotation of keys and values, "
        "cb = fitted codebook (lloyd1), clip = MSE-optimal clipping (clipk: keys only), o1 = 1 exact outlier per "
        "group (+0.375 bits per value: 3.875 / 2.875 / 4.875)",
        "- the spec strings k4v4 and k3v3 stand for s4-rotv, k2v2 for s4-rotv-clipk: chosen on the calibration text "
        "across model families (`benchmarks/results/key_rotation.md`, `kvpack/config.py`)",
        "",
        "| options | " + " | ".join(f"k{b}v{b}" for b in WIDTHS) + " |",
        "|---|" + "---|" * len(WIDTHS),
    ]
    for options in OPTION_SETS:
        label = " + ".join(names.get(o, o) for o in options.split("-")) if options else "plain KIVI"
        row_cells = []
        for bits in WIDTHS:
            cell = cells.get((options, bits))
            row_cells.append("—" if cell is None else f"{cell['delta_ppl_pct']:+.2f}% / {cell['mean_kl']:.4f}")
        lines.append(f"| {label} | " + " | ".join(row_cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    table = [
        {"options": o, "bits": b, **{k: c[k] for k in ("cache", "ppl", "delta_ppl_pct", "mean_kl", "top1_agreement")}}
        | {"bits_per_value": c["bits_per_value"]}
        for (o, b), c in sorted(cells.items(), key=lambda item: (OPTION_SETS.index(item[0][0]), item[0][1]))
        if o in OPTION_SETS
    ]
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "table": table}, indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}, .json")


if __name__ == "__main__":
    main()
