"""Basic numbers of the packed cache on the embedded default model: agreement and exact bytes.

    python benchmarks/basics.py            # writes benchmarks/results/basics.json and basics.md

Agreement: the first 512 tokens of WikiText-2 (../shared/data) streamed one token at a time through the
model with each cache, so every prediction attends to the quantized past; top-1 agreement and mean KL of
the next-token distribution vs the full-precision DynamicCache. Bytes: exact `cache.nbytes()` after a
prefill of N tokens, vs a float16 cache of the same tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import DynamicCache

import kvpack
from kvpack import KVPackCache
from kvpack.compat import cache_kwargs
from kvpack.models import DEFAULT_MODEL, load_model

ROOT = Path(__file__).resolve().parents[1]


def stream_logits(model, ids: torch.Tensor, cache, chunk: int, label: str) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, ids.shape[1], chunk), desc=label, leave=False):
            out.append(
                model(ids[:, start : start + chunk], **cache_kwargs(model, cache), use_cache=True).logits[0].float()
            )
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="k8v8,k4v4,k4v2,k2v2")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1, help="tokens per forward call (1 = streamed)")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext2_test.txt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "basics"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = args.specs.split(",")
    model, tokenizer = load_model(None)

    text = Path(args.data).read_text(encoding="utf-8")
    ids = tokenizer(text[: args.tokens * 40], return_tensors="pt").input_ids[:, : args.tokens]
    reference = stream_logits(model, ids, DynamicCache(config=model.config), args.chunk, "fp")
    rows = []
    for spec in specs:
        logits = stream_logits(model, ids, KVPackCache(model.config, spec), args.chunk, spec)
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        row = {
            "spec": KVPackCache(model.config, spec).cache_config.spec,
            "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "mean_kl": kl.mean().item(),
            "max_kl": kl.max().item(),
            "bytes": {},
        }
        for length in (int(n) for n in args.lengths.split(",")):
            cache = KVPackCache(model.config, spec)
            prompt = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                model(prompt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            row["bytes"][str(length)] = {"nbytes": cache.nbytes(), "fp16_nbytes": cache.fp16_nbytes()}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    result = {
        "benchmark": "basics",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "versions": {
            "kvpack": kvpack.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": DEFAULT_MODEL,
        "data": {"path": Path(args.data).name, "tokens": int(ids.shape[1]), "chunk": args.chunk},
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lengths = list(rows[0]["bytes"]) if rows else []
    lines = [
        f"# Basics: {DEFAULT_MODEL}, {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {result['machine']['platform']}, {args.threads} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Command: `{result['command']}`.",
        "",
        f"Agreement with the full-precision cache over the first {ids.shape[1]} WikiText-2 tokens "
        f"({'streamed one token at a time' if args.chunk == 1 else f'fed {args.chunk} tokens at a time'}); "
        "exact cache bytes after a prefill, and the ratio vs a float16 cache of the same tokens.",
        "",
        "| cache | top-1 agreement | mean KL | max KL | "
        + " | ".join(f"bytes @{n} | vs fp16 @{n}" for n in lengths)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(lengths),
    ]
    for row in rows:
        cells = []
        for n in lengths:
            b = row["bytes"][n]
            cells += [f"{b['nbytes']:,}", f"{b['fp16_nbytes'] / b['nbytes']:.2f}x"]
        lines.append(
            f"| {row['spec']} | {row['top1_agreement']:.2%} | {row['mean_kl']:.5f} | {row['max_kl']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
