"""Pruning x packing: kvpress presses alone, kvpack alone and both, in one run on the default model.

Each configuration prefills a context through the model with the press (if any) pruning each layer's keys/values and
the cache (transformers' DynamicCache, or a KVPackCache) storing what is kept; `kvpack.press.PackAfterPress` makes
the press see the exact keys/values and kvpack pack the survivors once. Then:

- **quality**: the next `--continuation` tokens of the text are fed one at a time at their original positions (as
  kvpress's pipeline positions an answer) and each step's next-token distribution is compared with the full cache's:
  ΔPPL of the continuation and mean KL(fp || config), over `--windows` windows of WikiText-2 (context + continuation
  each);
- **memory**: the exact bytes each cache holds after the context (`KVPackCache.nbytes()`; a DynamicCache's tensors),
  with the ratio to the full DynamicCache in the same dtype (the model runs in float32, so both hold float32 exact
  tokens);
- **retrieval**: passkey prompts (`kvpack.eval.passkey`) of `--passkey-tokens` tokens, the whole prompt prefilled with
  the press inside `model.generate`, greedy answer of 8 tokens; accuracy over depths x trials.

    python benchmarks/press_compose.py --out benchmarks/results/press_compose.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvpack import KVPackCache
from kvpack.attention import use_kvpack_attention
from kvpack.compat import cache_kwargs
from kvpack.eval import passkey
from kvpack.harness.caches import cache_nbytes
from kvpack.harness.results import (
    display_path,
    figure,
    format_bytes,
    markdown_page,
    markdown_table,
    provenance,
    publish,
)
from kvpack.models import load_model
from kvpack.press import PackAfterPress, require_kvpress
from kvpack.texts import default_data_path, load_tokens

PRESSES = ("SnapKVPress", "ExpectedAttentionPress", "KnormPress")
RATIOS = (0.25, 0.5)
SPECS = ("k4v4", "k2v2")


def configurations(presses: list[str], ratios: list[float], specs: list[str]) -> list[dict[str, Any]]:
    """fp; each press alone at each ratio; each spec alone; each press x spec at each ratio."""
    rows: list[dict[str, Any]] = [{"name": "fp", "press": None, "ratio": 0.0, "spec": None}]
    rows += [{"name": f"{p}@{r:g}", "press": p, "ratio": r, "spec": None} for p in presses for r in ratios]
    rows += [{"name": s, "press": None, "ratio": 0.0, "spec": s} for s in specs]
    rows += [
        {"name": f"{p}@{r:g} + {s}", "press": p, "ratio": r, "spec": s} for s in specs for p in presses for r in ratios
    ]
    return rows


def make_press(name: str | None, ratio: float) -> PackAfterPress | None:
    if name is None:
        return None
    kvpress = require_kvpress()
    return PackAfterPress(getattr(kvpress, name)(compression_ratio=ratio))


def make_cache(model: Any, spec: str | None) -> Any:
    return DynamicCache() if spec is None else KVPackCache(model, spec)


def prefill(model: Any, ids: torch.Tensor, cache: Any, press: PackAfterPress | None) -> None:
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, **cache_kwargs(model, cache))
        else:
            with press(model):
                model.model(input_ids=ids, **cache_kwargs(model, cache))


def continuation_logprobs(model: Any, cache: Any, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Log-probabilities `[n, vocab]` after each of `tokens` `[1, n]`, fed one at a time at positions start + i."""
    out = []
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            logits = model(
                input_ids=tokens[:, i : i + 1],
                position_ids=torch.tensor([[start + i]]),
                **cache_kwargs(model, cache),
            ).logits[0, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.stack(out)


def quality(model: Any, windows: list[torch.Tensor], context: int, configs: list[dict[str, Any]]) -> None:
    """Fill each config's `bytes`, `tokens_kept`, `ppl`, `delta_ppl_pct`, `mean_kl`, `top1` (averaged over windows)."""
    references = []
    for window in windows:
        cache = DynamicCache()
        prefill(model, window[:, :context], cache, None)
        references.append(continuation_logprobs(model, cache, window[:, context:], context))
    for config in configs:
        start = time.perf_counter()
        nll = kl = agree = count = 0.0
        for window, reference in zip(windows, references, strict=True):
            cache = make_cache(model, config["spec"])
            prefill(model, window[:, :context], cache, make_press(config["press"], config["ratio"]))
            config["bytes"] = cache_nbytes(cache)
            config["tokens_kept"] = cache.get_seq_length()
            logprobs = continuation_logprobs(model, cache, window[:, context:], context)
            targets = window[0, context + 1 :]
            nll += float(-logprobs[:-1].gather(1, targets[:, None]).sum())
            kl += float((reference.exp() * (reference - logprobs)).sum(-1)[:-1].sum())
            agree += float((reference.argmax(-1) == logprobs.argmax(-1))[:-1].sum())
            count += targets.numel()
        config.update(ppl=float(torch.tensor(nll / count).exp()), mean_kl=kl / count, top1=agree / count)
        print(
            f"  {config['name']:34s} {format_bytes(config['bytes']):>10s} PPL {config['ppl']:.3f}"
            f" KL {config['mean_kl']:.4f} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    fp = configs[0]
    for config in configs:
        config["delta_ppl_pct"] = 100 * (config["ppl"] / fp["ppl"] - 1)
        config["bytes_ratio"] = fp["bytes"] / config["bytes"]


def retrieval(
    model: Any, tokenizer: Any, n_tokens: int, depths: list[float], trials: int, configs: list[dict[str, Any]]
) -> None:
    """Fill each config's `passkey` accuracy over depths x trials (seed 0, the keys `kvpack passkey` uses)."""
    prompts = [
        passkey.build_prompt(tokenizer, n_tokens, depth, passkey.passkey_for(0, n_tokens, depth, trial))
        for depth in depths
        for trial in range(trials)
    ]
    for config in configs:
        correct = 0
        for prompt in prompts:
            cache = make_cache(model, config["spec"])
            press = make_press(config["press"], config["ratio"])
            ids = torch.tensor([prompt.input_ids])
            with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
                out = model.generate(
                    ids, max_new_tokens=passkey.MAX_NEW_TOKENS, do_sample=False, **cache_kwargs(model, cache)
                )
            correct += passkey.is_correct(tokenizer.decode(out[0, ids.shape[1] :]), prompt.passkey)
        config["passkey"] = correct / len(prompts)
        config["passkey_samples"] = len(prompts)
        print(f"  {config['name']:34s} passkey {correct}/{len(prompts)}", file=sys.stderr, flush=True)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    notes = [
        f"- model: {result['model']} ({result['dtype']}); data: `{s['data']}`, {s['windows']} windows of "
        f"{s['context']} context + {s['continuation']} continuation tokens",
        f"- passkey: {s['passkey_tokens']} tokens, depths {', '.join(map(str, s['depths']))} x {s['trials']} trials",
        "- presses: kvpress's, wrapped in `kvpack.press.PackAfterPress` (prune the exact prefill, then pack); "
        "ratio = fraction of each layer's context tokens removed",
        "- bytes: exact bytes the cache holds after the context (float32 exact tokens in both caches); x fp: the full "
        "DynamicCache's bytes over these",
    ]
    rows = [
        [
            c["name"],
            c["tokens_kept"],
            format_bytes(c["bytes"]),
            f"{c['bytes_ratio']:.2f}x",
            f"{c['delta_ppl_pct']:+.2f}%",
            f"{c['mean_kl']:.4f}",
            f"{100 * c['top1']:.1f}%",
            f"{c['passkey']:.0%}" if "passkey" in c else "n/a",
        ]
        for c in result["configs"]
    ]
    header = ["config", "tokens kept", "bytes", "x fp", "ΔPPL", "mean KL", "top-1", "passkey"]
    return markdown_page(
        "Pruning x packing: kvpress presses, kvpack, both", result, notes, markdown_table(header, rows, "lrrrrrrr")
    )


def plot(result: dict[str, Any], path: Path) -> None:
    with figure(path, "Pruning x packing on the default model", panels=2) as (left, right):
        groups = {"press alone": [], "kvpack alone": [], "press + kvpack": [], "fp": []}
        for c in result["configs"]:
            key = "fp" if c["name"] == "fp" else "press + kvpack" if c["press"] and c["spec"] else (
                "press alone" if c["press"] else "kvpack alone")  # fmt: skip
            groups[key].append(c)
        for label, configs in groups.items():
            if not configs:
                continue
            xs = [c["bytes"] / 2**20 for c in configs]
            left.scatter(xs, [max(c["mean_kl"], 1e-5) for c in configs], label=label)
            right.scatter(xs, [c.get("passkey", float("nan")) for c in configs], label=label)
            for c, x in zip(configs, xs, strict=True):
                left.annotate(c["name"], (x, max(c["mean_kl"], 1e-5)), fontsize=5)
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("cache bytes after the context (MiB)")
        left.set_ylabel("mean KL vs fp (continuation)")
        right.set_xscale("log")
        right.set_xlabel("cache bytes after the context (MiB)")
        right.set_ylabel("passkey accuracy")
        for axes in (left, right):
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presses", default=",".join(PRESSES))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--passkey-tokens", type=int, default=2048)
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--data", type=Path, default=default_data_path())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/press_compose.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    require_kvpress()
    configs = configurations(args.presses.split(","), [float(r) for r in args.ratios.split(",")], args.specs.split(","))
    model, tokenizer = load_model(None, verbose=False)
    use_kvpack_attention(model)
    span = args.context + args.continuation
    ids, sha = load_tokens(args.data, tokenizer, span * args.windows)
    windows = [ids[:, i * span : (i + 1) * span] for i in range(args.windows)]
    print(f"quality: {len(configs)} configs x {args.windows} windows", file=sys.stderr, flush=True)
    quality(model, windows, args.context, configs)
    depths = [float(d) for d in args.depths.split(",")]
    if args.passkey_tokens:
        print("passkey", file=sys.stderr, flush=True)
        retrieval(model, tokenizer, args.passkey_tokens, depths, args.trials, configs)
    result = provenance("press_compose", model, command="python benchmarks/press_compose.py " + " ".join(sys.argv[1:]))
    result["versions"]["kvpress"] = importlib.metadata.version("kvpress")
    result["settings"] = {
        "data": display_path(args.data),
        "data_sha256": sha,
        "context": args.context,
        "continuation": args.continuation,
        "windows": args.windows,
        "passkey_tokens": args.passkey_tokens,
        "depths": depths,
        "trials": args.trials,
    }
    result["configs"] = configs
    publish(result, args.out, markdown, plot)


if __name__ == "__main__":
    main()
