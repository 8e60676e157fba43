"""Dense-and-sparse outliers (`-o<k>`): quantization error of the default model's keys and values, and its cost.

    python benchmarks/outliers.py          # writes benchmarks/results/outliers.json and outliers.md

The first `--tokens` tokens of kvpack's CALIBRATION text (never the evaluation text: this also chooses how outliers
are picked) go through the embedded default model in one forward pass; every layer's cached keys (after RoPE) and
values are then quantized with the default layout (keys per channel, values per token, groups of 64) at each bit
width, with 0, 1, 2 outliers per group, with and without rotation. Relative MSE = sum over all layers of
|x - x_hat|^2 / sum of |x|^2, per tensor kind; bits per value from `QuantSpec.bits_per_value`.

`--centres` also compares ways of picking the outliers (the same error, other selection rules): `range`, the
entries whose removal leaves the narrowest range (what kvpack uses), `median` and `mean`, the entries farthest
from the group's median / mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import kvpack
import kvpack.quant.outliers as outliers_module
from kvpack.compat import cache_kwargs
from kvpack.config import QuantSpec
from kvpack.models import DEFAULT_MODEL, load_model
from kvpack.quant.tensor import PackedTensor
from kvpack.texts import calibration_data_path, load_tokens

ROOT = Path(__file__).resolve().parents[1]


def _farthest_from(centre: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def positions(groups: torch.Tensor, count: int) -> torch.Tensor:
        deviation = (groups - centre(groups)).abs()
        return deviation.topk(count, dim=-1).indices.sort(dim=-1).values

    return positions


SELECTIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "range": outliers_module.outlier_positions,
    "median": _farthest_from(lambda g: g.median(dim=-1, keepdim=True).values),
    "mean": _farthest_from(lambda g: g.mean(dim=-1, keepdim=True)),
}


def cached_keys_values(model: object, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's cached (keys, values) `[1, kv_heads, tokens, head_dim]` after one forward pass of `ids`."""
    cache = DynamicCache(config=model.config)  # type: ignore[attr-defined]
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache), use_cache=True)  # type: ignore[operator]
    return [(layer.keys.float(), layer.values.float()) for layer in cache.layers]


def relative_mse(tensors: list[torch.Tensor], spec: QuantSpec) -> float:
    error = total = 0.0
    for x in tensors:
        x_hat = PackedTensor.quantize(x, spec).dequantize(torch.float32)
        error += float(((x.double() - x_hat.double()) ** 2).sum())
        total += float((x.double() ** 2).sum())
    return error / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--outliers", default="0,1,2")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--centres", action="store_true", help="also compare the ways of picking outliers")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "outliers"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None, verbose=False)
    ids, sha256 = load_tokens(calibration_data_path(), tokenizer, args.tokens)
    layers = cached_keys_values(model, ids)
    keys, values = [k for k, _ in layers], [v for _, v in layers]
    bits_list = [int(b) for b in args.bits.split(",")]
    counts = [int(k) for k in args.outliers.split(",")]
    rows = []
    for rotation in ("none", "hadamard"):
        for bits in bits_list:
            for count in counts:
                key_spec = QuantSpec(
                    bits=bits, group_size=args.group, axis="channel", rotation=rotation, outliers=count
                )
                value_spec = QuantSpec(
                    bits=bits, group_size=args.group, axis="token", rotation=rotation, outliers=count
                )
                selections = SELECTIONS if args.centres and count else {"range": SELECTIONS["range"]}
                for selection, rule in selections.items():
                    outliers_module.outlier_positions = rule  # split_outliers looks it up at each call
                    try:
                        row = {
                            "bits": bits,
                            "outliers": count,
                            "rotation": rotation,
                            "selection": selection if count else "-",
                            "bits_per_value": key_spec.bits_per_value,
                            "key_rel_mse": relative_mse(keys, key_spec),
                            "value_rel_mse": relative_mse(values, value_spec),
                        }
                    finally:
                        outliers_module.outlier_positions = SELECTIONS["range"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {
        "what": "relative MSE of the default model's cached keys/values, quantized with and without outliers",
        "model": DEFAULT_MODEL,
        "data": {"path": "kvpack/data/calibration.txt", "sha256": sha256, "tokens": args.tokens},
        "layout": f"keys per channel, values per token, groups of {args.group}",
        "command": " ".join(["python benchmarks/outliers.py", *sys.argv[1:]]),
        "machine": platform.machine(),
        "threads": args.threads,
        "versions": {
            "kvpack": kvpack.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Outliers: relative MSE of the default model's keys and values ({args.tokens} calibration tokens)",
        "",
        f"Command: `{result['command']}`; {result['layout']}; {args.threads} thread(s); {result['date']}.",
        "",
        "| rotation | bits | outliers | selection | bits/value | key rel. MSE | value rel. MSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rotation']} | {r['bits']} | {r['outliers']} | {r['selection']} | {r['bits_per_value']:.3f} | "
            f"{r['key_rel_mse']:.4g} | {r['value_rel_mse']:.4g} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
