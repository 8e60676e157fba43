"""What limits each quality target: an ablation per width, on two model families, on the evaluation text and on the
calibration text.

The targets (model-agnostic spec strings; WikiText-2, 2048 tokens streamed): 4.5 bits per value ΔPPL <= +0.3% and
mean KL <= 0.002, 3.5 bits <= +0.5% / 0.005, 2.5 bits <= +6% / 0.05, a preset of at most 2.0 bits <= +15%. For each
width the table holds

- the width's spec strings (`k4v4`; at 3.5 bits also `k4v2` and `k2v4`);
- the same bits on one tensor only, the other at 8 bits (`k4v8`: keys alone, `k8v4`: values alone): which tensor
  limits;
- each quality option on top of the spec (keys rotated, plain KIVI with 4 sinks, clipped / codebook keys, one exact
  outlier per group, more sinks, a wider exact window): what each buys on each model;
- groups of 32 and 16 at today's float16 scale and zero (more bits per value): the most that cheaper metadata could
  buy (8-bit scales and zeros with a second-level scale halve the metadata, so groups of 32 would cost what groups
  of 64 cost now).

Every number is emulated over the whole sequence (`kvpack.calibrate.emulated_quality`: one forward per config, each
layer's keys and values stored as the config says and each query reading what a token-by-token stream would hold),
which is what streaming gives up to float rounding (tests/test_auto.py, tests/test_calibrate.py) at a fraction of its
time. The options measured here are diagnostics: defaults change only on the calibration text
(`benchmarks/select_on_calibration.py`, `benchmarks/key_rotation.py`, `auto-<bits>`).

    python benchmarks/target_limits.py --out benchmarks/results/target_limits.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from key_rotation import header_lines, load, result_header, write  # (benchmarks/ is the script's folder)

from kvpack.cache.plan import cache_shape, check_head_dims
from kvpack.calibrate import emulated_quality
from kvpack.config import as_config
from kvpack.harness.results import display_path, markdown_table
from kvpack.texts import calibration_data_path, default_data_path, load_tokens

# (width, its target: ΔPPL % and mean KL, specs in table order)
WIDTHS: tuple[tuple[str, float, float | None, tuple[str, ...]], ...] = (
    ("4.5", 0.3, 0.002, ("k4v4", "k4v8", "k8v4", "k4v4-rotk", "k4v4-plain-s4", "k4v4-clipk", "k4v4-cbk", "k4v4-ok1",
                         "k4v4-s16", "k4v4-r256", "k4v4-g32", "k4v4-g16")),
    ("3.5", 0.5, 0.005, ("k3v3", "k4v2", "k2v4", "k3v8", "k8v3", "k3v3-rotk", "k3v3-plain-s4", "k3v3-clipk",
                         "k3v3-cbk", "k3v3-ok1", "k3v3-s16", "k3v3-r256", "k3v3-g32", "k3v3-g16")),
    ("2.5", 6.0, 0.05, ("k2v2", "k2v8", "k8v2", "k2v2-rotk", "k2v2-plain-s4-clipk", "k2v2-cbk", "k2v2-ok1",
                        "k2v2-s16", "k2v2-r256", "k2v2-g32", "k2v2-g16")),
    ("2.0", 15.0, None, ("k2v2-gk128",)),  # the fewest bits a spec has here: 2.375 (values: groups <= head dim)
)  # fmt: skip
MODELS = ("smollm2", "gemma3-270m")
TEXTS = {"wikitext": (default_data_path, 2048), "calibration": (calibration_data_path, 512)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated among %(default)s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/target_limits.json"))
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the runs --out already holds for the models not named in --models (same specs and "
        "texts only), so one model can be added to a committed result",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = list(dict.fromkeys(spec for *_, row in WIDTHS for spec in row))
    runs: list[dict[str, Any]] = []
    result = {
        **result_header("target_limits.py"),
        "texts": {name: {"path": display_path(path()), "tokens": tokens} for name, (path, tokens) in TEXTS.items()},
        "widths": [{"bits": w, "target_delta_ppl_pct": p, "target_kl": k, "specs": list(s)} for w, p, k, s in WIDTHS],
        "runs": runs,
    }
    if args.keep and args.out.exists():
        runs += _kept_runs(json.loads(args.out.read_text()), result, args.models.split(","))
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models.split(","):
            model, tokenizer = load(model_name, Path(workdir))
            run: dict[str, Any] = {"model": model_name, "rows": {}}
            configs = [as_config(s) for s in specs]
            shape = cache_shape(model.config)
            for config in configs:  # before any model run: a spec this model cannot hold fails in seconds
                check_head_dims(config, shape.head_dim, shape.head_dim, where=f"{model_name}, {config.spec}: ")
            for text, (path, tokens) in TEXTS.items():
                ids, sha = load_tokens(path(), tokenizer, tokens)
                start = time.perf_counter()
                qualities = emulated_quality(model, ids, configs, progress=False)
                seconds = time.perf_counter() - start
                run[f"{text}_sha256"] = sha
                run[f"{text}_fp_ppl"] = qualities[0].reference_ppl
                for spec, quality in zip(specs, qualities, strict=True):
                    row = run["rows"].setdefault(spec, {"bits_per_value": as_config(spec).average_bits()})
                    row[text] = {"delta_ppl_pct": quality.delta_ppl_pct, "kl": quality.kl}
                print(f"{model_name} {text}: {len(specs)} configs in {seconds:.0f} s", file=sys.stderr, flush=True)
            runs.append(run)
            del model
            write(result, args.out, markdown)  # after each model: a long run is not lost
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


def _kept_runs(old: dict[str, Any], new: dict[str, Any], models: list[str]) -> list[dict[str, Any]]:
    """The runs of an earlier result worth keeping: its other models, only when it measured the same specs on the same
    texts (else a table would mix two definitions), with the earlier commands recorded by the caller's header."""
    for field in ("texts", "widths"):
        if old.get(field) != new[field]:
            raise SystemExit(f"--keep: {field} in the existing result differ from this script's; rerun every model")
    kept = [run for run in old["runs"] if run["model"] not in models]
    for run in kept:
        run.setdefault("measured", {"date": old.get("date"), "command": old.get("command")})
    return kept


def _cell(row: dict[str, Any], text: str) -> str:
    return f"{row[text]['delta_ppl_pct']:+.2f}% / {row[text]['kl']:.4f}"


def markdown(result: dict[str, Any]) -> str:
    runs, texts = result["runs"], result["texts"]
    data = "; ".join(f"{name}: `{t['path']}`, first {t['tokens']} tokens of each model's tokenization"
                     for name, t in texts.items())  # fmt: skip
    data += "; emulated over the whole sequence (what a token-by-token stream gives, up to float rounding)"
    lines = header_lines(
        {**result, "runs": [{"model": r["model"], "rows": [{"ppl": r["wikitext_fp_ppl"]}]} for r in runs]},
        "What limits each quality target: keys vs values, each option, and group size, per width",
        data,
    )
    lines[-2] = lines[-2].replace("fp PPL", "fp PPL on WikiText")
    lines[-1:-1] = [f"- {run['model']}: kept from the run of {run['measured']['date']} (`{run['measured']['command']}`)"
                    for run in runs if "measured" in run]  # fmt: skip
    header = ["spec", "bits/value", *(f"{run['model']} {text}" for run in runs for text in texts)]
    for width in result["widths"]:
        target = f"ΔPPL <= +{width['target_delta_ppl_pct']:g}%"
        target += f", KL <= {width['target_kl']:g}" if width["target_kl"] is not None else ""
        lines += [f"## {width['bits']} bits per value (target on WikiText: {target})", ""]
        body = [
            [spec, f"{runs[0]['rows'][spec]['bits_per_value']:.3g}", *(_cell(run["rows"][spec], t) for run in runs
                                                                      for t in texts)]
            for spec in width["specs"]
        ]  # fmt: skip
        lines += [*markdown_table(header, body), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
