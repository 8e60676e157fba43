"""Fit kvpack's non-uniform codebooks (`kvpack.quant.codebooks`) and measure them.

Lloyd-Max levels per bit width (2, 3, 4) and per group layout (keys: axis "channel", groups of `--group` tokens of
one channel; values: axis "token", groups of `--group` channels of one token), fitted on the keys/values of the
default model over kvpack's calibration text (never the evaluation text), each group normalized as the quantizer
sees it: rotated by the Hadamard rotation, then `(x - zero) / scale` with the float16 zero and scale of the group's
min/max range (so the samples lie in [0, 2**bits - 1]). Lloyd's iteration runs on a fine histogram of those samples
(2**16 bins), starting from the uniform levels.

    python scripts/fit_codebooks.py fit      # prints the `_LEVELS` block for src/kvpack/quant/codebooks.py
    python scripts/fit_codebooks.py report   # relative MSE of K and V, uniform vs the shipped codebook, +-clip, +-rot

The calibration token windows are split: `fit` uses windows [0, --windows), `report` the next --windows ones, so the
reported errors are on data the fit did not see.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import torch

from kvpack.compat import cache_kwargs
from kvpack.config import FITTED_CODEBOOK, QuantSpec
from kvpack.models import load_model
from kvpack.quant.affine import quantize_groups, to_groups
from kvpack.quant.rotation import rotate
from kvpack.quant.tensor import PackedTensor
from kvpack.texts import calibration_data_path, load_tokens

ROLES = {"keys": "channel", "values": "token"}
BINS = 1 << 16


def model_kv(windows: range, window: int) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """Keys and values `[windows, kv_heads, window, head_dim]` per layer (keys after RoPE, as a cache sees them)."""
    from transformers import DynamicCache

    model, tokenizer = load_model(None, verbose=False)
    path = calibration_data_path()
    ids, sha = load_tokens(path, tokenizer, window * windows.stop)
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for w in windows:
            cache = DynamicCache(config=model.config)
            model(ids[:, w * window : (w + 1) * window], **cache_kwargs(model, cache), use_cache=True)
            for i, layer in enumerate(cache.layers):
                if len(keys) <= i:
                    keys.append([])
                    values.append([])
                keys[i].append(layer.keys[0].float())
                values[i].append(layer.values[0].float())
    return [torch.stack(k) for k in keys], [torch.stack(v) for v in values], sha


def normalized(tensors: list[torch.Tensor], bits: int, group: int, axis: str) -> torch.Tensor:
    """All elements in units of their group's step from its zero, as `quantize_groups` sees them (rotated)."""
    parts = []
    for x in tensors:
        groups = to_groups(rotate(x, "hadamard"), group, axis)  # type: ignore[arg-type]
        q = quantize_groups(groups, bits)
        parts.append(((groups - q.zero.float().unsqueeze(-1)) / q.scale.float().unsqueeze(-1)).flatten())
    return torch.cat(parts)


def lloyd_max(samples: torch.Tensor, bits: int, iterations: int = 500) -> torch.Tensor:
    """Lloyd-Max levels (float64 `[2**bits]`, sorted) of samples in [0, qmax], on a histogram of BINS bins."""
    qmax = (1 << bits) - 1
    index = (samples.double() / qmax * BINS).long().clamp_(0, BINS - 1)
    counts = torch.bincount(index, minlength=BINS).double()
    sums = torch.bincount(index, weights=samples.double(), minlength=BINS)
    occupied = counts > 0
    centres, weights = sums[occupied] / counts[occupied], counts[occupied]
    levels = torch.arange(qmax + 1, dtype=torch.float64)
    for _ in range(iterations):
        cell = torch.bucketize(centres, (levels[1:] + levels[:-1]) / 2)
        mass = torch.bincount(cell, weights=weights, minlength=qmax + 1)
        moment = torch.bincount(cell, weights=weights * centres, minlength=qmax + 1)
        fresh = torch.where(mass > 0, moment / mass.clamp_min(1e-300), levels)
        if float((fresh - levels).abs().max()) < 1e-9:
            levels = fresh
            break
        levels = fresh
    return levels


def fit(args: argparse.Namespace) -> None:
    keys, values, sha = model_kv(range(args.windows), args.window)
    lines = []
    for role, tensors in (("keys", keys), ("values", values)):
        axis = ROLES[role]
        for bits in (2, 3, 4):
            levels = lloyd_max(normalized(tensors, bits, args.group, axis), bits)
            text = ", ".join(f"{float(v):.6f}" for v in levels)
            lines.append(f'    ("{FITTED_CODEBOOK}", "{axis}", {bits}): ({text}),  # {role}')
            print(f"{role} {bits} bits: {text}", file=sys.stderr)
    tokens = args.window * args.windows
    print(
        f"# Made by: python scripts/fit_codebooks.py fit --windows {args.windows} --window {args.window} "
        f"--group {args.group}  ({datetime.date.today().isoformat()})"
    )
    print(f"# on the first {tokens} tokens of the calibration text (SHA-256 {sha}), rotated, group {args.group}.")
    print("_LEVELS: dict[tuple[str, str, int], tuple[float, ...]] = {")
    print("\n".join(lines))
    print("}")


def relative_mse(tensors: list[torch.Tensor], spec: QuantSpec) -> float:
    error = total = 0.0
    for x in tensors:
        x_hat = PackedTensor.quantize(x, spec).dequantize()
        error += float(((x_hat - x) ** 2).sum())
        total += float((x**2).sum())
    return error / total


def report(args: argparse.Namespace) -> None:
    keys, values, sha = model_kv(range(args.windows, 2 * args.windows), args.window)
    rows: list[dict[str, Any]] = []
    for bits in (2, 3, 4):
        for rotation in ("none", "hadamard"):
            for codebook in ("uniform", FITTED_CODEBOOK):
                for clip in (False, True):
                    row: dict[str, Any] = dict(bits=bits, rotation=rotation, codebook=codebook, clip=clip)
                    for role, tensors in (("keys", keys), ("values", values)):
                        spec = QuantSpec(bits, args.group, ROLES[role], rotation, codebook, clip)  # type: ignore[arg-type]
                        row[role] = relative_mse(tensors, spec)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"relative MSE on calibration windows {args.windows}..{2 * args.windows - 1} of {args.window} tokens "
        f"(SHA-256 {sha[:12]}...), group {args.group}"
    )
    print("| bits | rotation | codebook | clip | K rel. MSE | V rel. MSE |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bits']} | {r['rotation']} | {r['codebook']} | {'yes' if r['clip'] else 'no'} | "
            f"{r['keys']:.5f} | {r['values']:.5f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"calibration_sha256": sha, "window": args.window, "windows": args.windows, "rows": rows}, f, indent=1
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("fit", "report"))
    parser.add_argument("--windows", type=int, default=4, help="token windows to fit (report: the next ones)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window (one forward pass each)")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="report: also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit(args) if args.mode == "fit" else report(args)


if __name__ == "__main__":
    main()
