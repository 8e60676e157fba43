"""`kvpack bench persist`: loading a saved prompt cache vs recomputing its prefill, and its size on disk.

For each prefix length (the first N tokens of WikiText-2) and cache spec, in one process:

- prefill: a fresh cache of the spec takes the N tokens (`kvpack.prefix_cache`); save: `cache.save` (with the
  tokenizer's hash), and the file's bytes; then the next `suffix` tokens (the "question") go through the model on
  the fresh cache, which gives the first generated token: prefill + first token.
- load: `KVPackCache.load` with every check (checksum, model and tokenizer fingerprint), `repeats` times from the
  OS page cache (the file was just written), and once after asking the OS to drop the file's cached pages
  (`posix_fadvise(DONTNEED)`: a read from this machine's disk); then load + the same suffix: load + first token.
  The first token's logits are compared with the fresh cache's (they must be identical). The model runs kvpack's
  attention, as `kvpack generate` does (prefills go through SDPA either way).
- the reference on disk: the same N tokens prefilled into transformers' `DynamicCache`, its keys and values dumped
  as float16 to a safetensors file, and loaded back into a `DynamicCache` in the model's dtype (+ first token): what
  saving the full-precision cache instead would cost. Untimed warm-up runs of each kind come first.

JSON is the source of truth (machine, versions, command, date, the load average before and after: this VM's 2
cores are shared, and its timings vary); Markdown is made from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvpack.bench.compare import result_header

DEFAULT_SPECS = "k4v4,k8v8"
DEFAULT_CONTEXTS = "1024,4096,8192"
DEFAULT_RESULTS = Path("benchmarks/results/persist.json")


def _drop_from_page_cache(path: Path) -> bool:
    """Ask the OS to forget the file's cached pages (so the next read comes from disk); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


@torch.no_grad()
def _first_token_logits(model: Any, cache: Any, suffix: torch.Tensor) -> torch.Tensor:
    return model(input_ids=suffix, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def _fp16_dump(model: Any, ids: torch.Tensor, suffix: torch.Tensor, path: Path, repeats: int) -> dict[str, Any]:
    """The full-precision reference: DynamicCache prefill (+ first token); its tensors dumped as float16, and loaded
    back (the file read whole, the tensors in the model's dtype in a DynamicCache) (+ first token)."""
    import safetensors.torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    tensors = {}
    for idx, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            tensors[f"layers.{idx}.keys"] = keys.to(torch.float16).contiguous()
            tensors[f"layers.{idx}.values"] = values.to(torch.float16).contiguous()
    path.write_bytes(safetensors.torch.save(tensors))
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    _first_token_logits(model, cache, suffix)
    first_s = time.perf_counter() - start
    loads, loads_first = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = safetensors.torch.load(path.read_bytes())
        restored = DynamicCache(config=model.config)
        for idx in range(len(cache.layers)):
            restored.update(
                loaded[f"layers.{idx}.keys"].to(model.device, model.dtype),
                loaded[f"layers.{idx}.values"].to(model.device, model.dtype),
                idx,
            )
        loads.append(time.perf_counter() - start)
        _first_token_logits(model, restored, suffix)
        loads_first.append(time.perf_counter() - start)
    load_first_s = statistics.median(loads_first)
    return {
        "file_bytes": path.stat().st_size,
        "prefill_s": prefill_s,
        "prefill_first_token_s": prefill_s + first_s,
        "save_s": save_s,
        "load_s": statistics.median(loads),
        "load_first_token_s": load_first_s,
        "speedup_first_token": (prefill_s + first_s) / load_first_s,
    }


def _warm_up(model: Any, tokenizer: Any, ids: torch.Tensor, specs: list[str], tmp: Path) -> None:
    """One untimed prefill, save and load of each kind, so that first-call costs (allocator, threads, kernels) are
    not timed."""
    from transformers import DynamicCache

    from kvpack.cache import KVPackCache
    from kvpack.cache.persist import prefix_cache

    with torch.no_grad():
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    for spec in specs:
        prefix_cache(model, ids, spec).save(tmp / "warm-up.kvpc", model, ids, tokenizer)
        _first_token_logits(model, KVPackCache.load(tmp / "warm-up.kvpc", model, tokenizer), ids[:, :4])


def _kvpack_row(
    model: Any, tokenizer: Any, spec: str, ids: torch.Tensor, suffix: torch.Tensor, path: Path, repeats: int
) -> dict[str, Any]:
    from kvpack.cache import KVPackCache
    from kvpack.cache.persist import prefix_cache

    fresh = prefix_cache(model, ids, spec)
    assert fresh.prefill_s is not None
    start = time.perf_counter()
    fresh.save(path, model, ids, tokenizer)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    fresh_logits = _first_token_logits(model, fresh, suffix)
    first_s = time.perf_counter() - start
    loads, loads_first, identical = [], [], True
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = KVPackCache.load(path, model, tokenizer)
        loads.append(time.perf_counter() - start)
        logits = _first_token_logits(model, loaded, suffix)
        loads_first.append(time.perf_counter() - start)
        identical = identical and torch.equal(logits, fresh_logits)
    cold_s = None
    if _drop_from_page_cache(path):
        start = time.perf_counter()
        KVPackCache.load(path, model, tokenizer)
        cold_s = time.perf_counter() - start
    load_first_s = statistics.median(loads_first)
    return {
        "cache": fresh.cache_config.spec,
        "file_bytes": path.stat().st_size,
        "prefill_s": fresh.prefill_s,
        "prefill_first_token_s": fresh.prefill_s + first_s,
        "save_s": save_s,
        "load_s": statistics.median(loads),
        "load_min_s": min(loads),
        "load_cold_s": cold_s,
        "load_first_token_s": load_first_s,
        "speedup_first_token": (fresh.prefill_s + first_s) / load_first_s,
        "identical_first_token_logits": identical,
    }


def run_persist(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `kvpack bench persist` measures, as the JSON-ready result."""
    from kvpack.attention import use_kvpack_attention
    from kvpack.attention.registry import prepare
    from kvpack.eval.perplexity import load_tokens
    from kvpack.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    use_kvpack_attention(model)  # as `kvpack generate`: the first token after a load reads the packed cache
    prepare("auto")  # a kernel compiled on first use must not land in a timed step
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 1 << 30
    contexts = [min(int(c), limit - args.suffix) for c in args.contexts.split(",") if c]
    all_ids, data_sha = load_tokens(args.data, tokenizer, max(contexts) + args.suffix)
    all_ids = all_ids.to(model.device)
    specs = [s for s in args.caches.split(",") if s]
    result: dict[str, Any] = {
        **result_header("persist", model, args.model),
        "data": Path(args.data).name,
        "data_sha256": data_sha,
        "contexts": contexts,
        "suffix_tokens": args.suffix,
        "repeats": args.repeats,
        "load_average_1min": {"before": load_before[0]},
        "rows": [],
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        _warm_up(model, tokenizer, all_ids[:, : min(256, contexts[0])], specs, Path(tmp))
        for context in contexts:
            ids, suffix = all_ids[:, :context], all_ids[:, context : context + args.suffix]
            print(f"{context} tokens: fp16 reference ...", file=sys.stderr, flush=True)
            fp16 = _fp16_dump(model, ids, suffix, Path(tmp) / f"fp16-{context}.safetensors", args.repeats)
            result["rows"].append({"context": context, "cache": "fp16 dump (DynamicCache)", **fp16})
            for spec in specs:
                print(f"{context} tokens: {spec} prefill, save, load ...", file=sys.stderr, flush=True)
                row = _kvpack_row(
                    model, tokenizer, spec, ids, suffix, Path(tmp) / f"{spec}-{context}.kvpc", args.repeats
                )
                row["size_vs_fp16_dump"] = fp16["file_bytes"] / row["file_bytes"]
                result["rows"].append({"context": context, **row})
    result["load_average_1min"]["after"] = os.getloadavg()[0]
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The persist result as a Markdown page."""
    load = result["load_average_1min"]
    lines = [
        f"# kvpack bench persist: {result['model']} ({result['dtype']})",
        "",
        f"- date: {result['date']}; machine: {result['machine']['platform']}, {result['machine']['torch_threads']} "
        f"torch threads, {result['machine']['device']}; 1-minute load average {load['before']:.1f} before, "
        f"{load['after']:.1f} after (a shared VM: other jobs ran beside this one)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- command: `{result['command']}`",
        f"- prefixes: the first N tokens of {result['data']}; then a {result['suffix_tokens']}-token suffix (the "
        "question) gives the first generated token. Load times: median of "
        f"{result['repeats']} loads from the page cache, and one after dropping the file's pages (cold); every load "
        "verifies the checksum and the model and tokenizer fingerprints.",
        "",
        "| prefix tokens | cache | file | vs fp16 dump | prefill s | save s | load s | load s (cold) | "
        "prefill + 1st token s | load + 1st token s | speedup | same 1st-token logits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        kvpack = "load_cold_s" in row
        cells = [
            f"{row['context']:,}",
            row["cache"],
            f"{row['file_bytes'] / 1e6:,.1f} MB",
            f"{row['size_vs_fp16_dump']:.2f}x smaller" if kvpack else "1.00x",
            f"{row['prefill_s']:.2f}",
            f"{row['save_s']:.3f}",
            f"{row['load_s']:.3f}",
            f"{row['load_cold_s']:.3f}" if kvpack and row["load_cold_s"] is not None else "",
            f"{row['prefill_first_token_s']:.2f}",
            f"{row['load_first_token_s']:.3f}",
            f"{row['speedup_first_token']:.0f}x",
            ("yes" if row["identical_first_token_logits"] else "NO") if kvpack else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cmd_persist(args: argparse.Namespace) -> int:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_persist(args)
    out.write_text(json.dumps(result, indent=2) + "\n")
    page = to_markdown(result)
    out.with_suffix(".md").write_text(page)
    print(page)
    print(f"wrote {out}, {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def add_parser(bench_subparsers: Any) -> None:
    """Register `kvpack bench persist` on the `kvpack bench` subparsers."""
    from kvpack.eval.perplexity import default_data_path

    parser = bench_subparsers.add_parser(
        "persist",
        help="loading a saved prompt cache vs recomputing the prefill; file size vs a float16 dump",
        description="For each prefix length and cache spec: prefill + first token vs load (all checks) + first token, "
        "save and load times, and the file's size vs a float16 safetensors dump of the same tokens' DynamicCache. "
        "Writes JSON and Markdown.",
    )
    parser.add_argument(
        "--caches", default=DEFAULT_SPECS, help=f"kvpack specs, comma-separated (default {DEFAULT_SPECS})"
    )
    parser.add_argument(
        "--contexts", default=DEFAULT_CONTEXTS, help=f"prefix lengths (default {DEFAULT_CONTEXTS}; capped)"
    )
    parser.add_argument("--suffix", type=int, default=16, help="tokens after the prefix (the question; default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="loads timed per file (default 5)")
    parser.add_argument("--data", default=str(default_data_path()), help="text file (default: WikiText-2 test)")
    parser.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--tmp", default=None, help="directory for the files (default: the system's temporary one)")
    parser.add_argument("--json", default=str(DEFAULT_RESULTS), help="JSON path (.md beside it)")
    parser.set_defaults(func=cmd_persist)
