"""Calibration by Fisher estimate vs by emulation: the same sensitivity table, minutes apart.

`kvpack calibrate --method emulate` measures each (layer, tensor, bits) KL by running the model's layers after the
perturbed one (240 forwards for the default model); `--method fisher` (the default) estimates all of them from one
forward and backward pass. This compares, on the default model and kvpack's calibration text (512 tokens, the
profiles' settings):

- the two tables: Spearman rank correlation (overall and per bit width) and the ratio of their sums;
- the allocations each table gives at several budgets: their true KL, measured by the emulated meter on the whole
  allocated config (`SensitivityMeter.kl(None, ...)`), so a worse estimate shows as a worse allocation;
- the seconds the Fisher pass takes (torch threads as given; the emulated table's seconds are its profile's).

The emulated table is the committed profile `benchmarks/profiles/smollm2-4.5.json` (its base, its tokens), so only
the Fisher pass and the allocations' checks run here.

    python benchmarks/calibration_methods.py --out benchmarks/results/calibration_methods.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvpack.calibrate import SensitivityMeter, allocate, fisher_sensitivity
from kvpack.harness.results import markdown_page, markdown_table, provenance, publish
from kvpack.models import load_model
from kvpack.profile import load_profile
from kvpack.texts import calibration_data_path, load_tokens

BUDGETS = (4.5, 3.5, 3.0, 2.5)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        return torch.tensor(values).argsort().argsort().double()

    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def markdown(result: dict[str, Any]) -> str:
    notes = [
        f"- model: {result['model']} ({result['dtype']}); calibration text, {result['tokens']} tokens; base "
        f"`{result['base']}`; candidates {result['candidates']}",
        f"- emulated table: `{result['emulated_profile']}` ({result['emulated_seconds']:.0f} s when it was measured, "
        "1 thread); Fisher pass: "
        f"{result['fisher_seconds']:.1f} s here ({result['machine']['torch_threads']} threads)",
        f"- rank correlation of the {result['measurements']} measurements: {result['spearman']:.3f}; per bit width: "
        + ", ".join(f"{b}: {r:.3f}" for b, r in result["spearman_by_bits"].items())
        + f"; sum of Fisher estimates / sum of emulated KLs: {result['scale']:.2f}",
    ]
    rows = [
        [
            row["budget_bits"],
            f"{row['emulate']['average_bits']:.3f}",
            f"{row['emulate']['true_kl']:.6f}",
            f"{row['fisher']['average_bits']:.3f}",
            f"{row['fisher']['true_kl']:.6f}",
            f"{row['fisher']['true_kl'] / row['emulate']['true_kl']:.2f}",
        ]
        for row in result["allocations"]
    ]
    header = ["budget", "emulate: bits", "emulate: true KL", "fisher: bits", "fisher: true KL", "fisher / emulate"]
    body = [
        "True KL: the emulated meter's mean KL with the whole allocated config (every layer's keys and values as the",
        "cache stores them), on the calibration text.",
        "",
        *markdown_table(header, rows, "rrrrrr"),
    ]
    return markdown_page("Calibration: Fisher estimate vs emulation", result, notes, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=Path("benchmarks/profiles/smollm2-4.5.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_methods.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emulated = load_profile(args.profile)
    base = replace(emulated.config, layer_bits=())
    model, tokenizer = load_model(None, verbose=False)
    ids, _ = load_tokens(calibration_data_path(), tokenizer, emulated.tokens)
    start = time.perf_counter()
    key_kl, value_kl = fisher_sensitivity(model, ids, base, emulated.candidates, progress=False)
    fisher_seconds = time.perf_counter() - start
    print(f"fisher: {fisher_seconds:.1f} s", file=sys.stderr, flush=True)
    fisher_all = [kl for rows in (key_kl, value_kl) for row in rows for kl in row]
    emulated_all = [kl for rows in (emulated.key_kl, emulated.value_kl) for row in rows for kl in row]
    by_bits = {}
    for i, bits in enumerate(emulated.candidates):
        f = [row[i] for rows in (key_kl, value_kl) for row in rows]
        e = [row[i] for rows in (emulated.key_kl, emulated.value_kl) for row in rows]
        by_bits[str(bits)] = spearman(f, e)
    meter = SensitivityMeter(model, ids, base)
    allocations = []
    dim = emulated.model.head_dim
    for budget in BUDGETS:
        row: dict[str, Any] = {"budget_bits": budget}
        for method, (keys, values) in (
            ("emulate", (emulated.key_kl, emulated.value_kl)),
            ("fisher", (key_kl, value_kl)),
        ):
            chosen = allocate(keys, values, emulated.candidates, base, budget, dim, dim)
            config = replace(base, layer_bits=chosen.layer_bits)
            row[method] = {
                "average_bits": chosen.average_bits,
                "layer_bits": [list(pair) for pair in chosen.layer_bits],
                "true_kl": meter.kl(None, ("key", "value"), config),
            }
        print(f"budget {budget}: emulate {row['emulate']['true_kl']:.6f} fisher {row['fisher']['true_kl']:.6f}",
              file=sys.stderr, flush=True)  # fmt: skip
        allocations.append(row)
    result = provenance("calibration_methods", model, command="python benchmarks/calibration_methods.py "
                        + " ".join(sys.argv[1:]))  # fmt: skip
    result.update(
        tokens=emulated.tokens,
        base=base.spec,
        candidates=list(emulated.candidates),
        emulated_profile=str(args.profile),
        emulated_seconds=emulated.seconds,
        fisher_seconds=fisher_seconds,
        measurements=len(fisher_all),
        spearman=spearman(fisher_all, emulated_all),
        spearman_by_bits=by_bits,
        scale=sum(fisher_all) / sum(emulated_all),
        fisher_key_kl=key_kl,
        fisher_value_kl=value_kl,
        allocations=allocations,
    )
    publish(result, args.out, markdown)


if __name__ == "__main__":
    main()
