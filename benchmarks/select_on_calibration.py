"""Rank cache configs on the CALIBRATION text (never the evaluation text): emulated mean KL vs the exact cache.

Each config quantizes every layer's keys and values as a streamed `KVPackCache` would hold them (the emulation of
`kvpack.calibrate`: full-sequence forwards whose attention reads, for each query, the tokens the cache would
hold packed as quantize-dequantized and the rest exact). This is how kvpack's presets and the options of the plain
spec strings were chosen; `kvpack compare` on the evaluation text then measures them.

    python benchmarks/select_on_calibration.py --tokens 1024 --out benchmarks/results/selection_calibration.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from kvpack.calibrate import SensitivityMeter
from kvpack.config import as_config
from kvpack.models import load_model
from kvpack.texts import calibration_data_path, load_tokens

# Written with -plain, so that each names the same cache whatever the spec strings start from.
CANDIDATES = (
    "k8v8,k8v8-plain-s4,"
    "k4v4,k4v4-plain,k4v4-plain-s4,k4v4-plain-s4-rot,k4v4-plain-s4-rotv,k4v4-plain-s16-rot,k4v4-plain-s4-rot-ov1,"
    "k4v4-plain-gk128-gv64-s4-rot-o1,"
    "k3v3,k3v3-plain-s4,k3v3-plain-s4-rot,k3v3-plain-s4-rotv,k3v3-plain-s4-rot-ov1,k3v3-plain-gk128-gv64-s4-rot-o1,"
    "k4v2,k4v2-plain-s4-rot,k3v4-plain-gk128-gv64-s4-rot,"
    "k2v2,k2v2-plain-s4,k2v2-plain-s4-rot,k2v2-plain-s4-rot-clipk,k2v2-plain-s16-rot,k2v2-plain-s4-rotk,"
    "k2v2-plain-s4-rot-ov1,k2v2-plain-gk128-gv64-s4-rot-o1,k2v2-plain-gk128-gv64-s4-rot-ov1,"
    "k3v2-plain-gk128-gv64-s4-rot,k2v3-plain-gk128-gv64-s4-rot,"
    "benchmarks/profiles/smollm2-3.5.json,benchmarks/profiles/smollm2-3.0.json,benchmarks/profiles/smollm2-2.5.json"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", default=CANDIDATES, help="comma-separated specs or profile paths")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection_calibration.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None)
    ids, sha = load_tokens(calibration_data_path(), tokenizer, args.tokens)
    meters: dict[tuple[int, int, int], SensitivityMeter] = {}
    rows = []
    for name in args.caches.split(","):
        config = as_config(name)
        shape = (config.sinks, config.residual, config.block_tokens)
        if shape not in meters:
            meters[shape] = SensitivityMeter(model, ids, config)
        start = time.perf_counter()
        kl = meters[shape].kl(None, ("key", "value"), config)
        label = f"profile:{Path(name).stem}" if name.endswith(".json") else config.spec
        rows.append((label, config.average_bits(), kl))
        print(f"{label:32s} {config.average_bits():6.3f} bits  KL {kl:.5f}  ({time.perf_counter() - start:.1f} s)")
    lines = [
        "# Config selection on the calibration text (emulated streamed cache, mean KL vs exact)",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; machine: {platform.platform()},"
        f" {args.threads} torch thread(s); torch {torch.__version__}",
        f"- data: kvpack's calibration text (sha256 {sha[:12]}…), first {args.tokens} tokens; default model",
        f"- command: `python benchmarks/select_on_calibration.py --tokens {args.tokens}` (default candidates)",
        "",
        "| cache | bits/value | mean KL |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {bits:.3f} | {kl:.5f} |" for label, bits, kl in sorted(rows, key=lambda r: (-r[1], r[2]))]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
