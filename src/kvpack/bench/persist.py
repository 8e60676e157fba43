"""`kvpack bench persist`: loading a saved prompt cache vs recomputing its prefill, and its size on disk.

For each prefix length (the first N tokens of WikiText-2), in one process, for each cache spec and for the
full-precision reference:

- prefill + first token: a fresh cache takes the N tokens (`kvpack.prefix_cache`, or transformers' `DynamicCache`),
  then the next `suffix` tokens (the "question") go through the model on it, which gives the first generated token.
- save: `cache.save` (with the tokenizer's hash); for the reference, its keys and values as float16 in a safetensors
  file (what saving the full-precision cache instead would cost). The files' bytes.
- load + first token: `KVPackCache.load` with every check (checksum, model and tokenizer fingerprints), then the same
  suffix; for the reference, the file read whole and its tensors put in a `DynamicCache` in the model's dtype. The
  first token's logits after a kvpack load are compared with the fresh cache's (they must be identical). One more
  load after asking the OS to drop the file's cached pages (`posix_fadvise(DONTNEED)`) reads it from disk (cold).

Timings are the best of `prefill_repeats` prefills and of `repeats` loads, interleaved across the caches: on a
shared machine other jobs only ever add time, so the minimum is the estimate of the work itself (medians are kept
in the JSON too). Each is taken in wall-clock and in this process's CPU seconds, which other jobs do not inflate
(meaningful with one torch thread: more threads add their spin-waits to it). The model runs kvpack's attention,
as `kvpack generate` does (prefills go through SDPA either way); untimed warm-up runs of each kind come first.
JSON is the source of truth (machine, versions, command, date, the load average before and after); Markdown is
made from it.
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
from kvpack.compat import cache_kwargs

DEFAULT_SPECS = "k4v4,k8v8"
DEFAULT_CONTEXTS = "1024,4096,8192"
DEFAULT_RESULTS = Path("benchmarks/results/persist.json")
REFERENCE = "fp16 dump (DynamicCache)"


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
    return model(input_ids=suffix, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]


def _fp16_tensors(cache: Any) -> dict[str, torch.Tensor]:
    tensors = {}
    for idx, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            tensors[f"layers.{idx}.keys"] = keys.to(torch.float16).contiguous()
            tensors[f"layers.{idx}.values"] = values.to(torch.float16).contiguous()
    return tensors


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time is what other jobs on a shared machine do not inflate
    (with one torch thread; more threads add their spin-waits to it)."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


class _Case:
    """One cache kind at one prefix length: how to prefill it (and save it once), and how to load it."""

    def __init__(self, name: str, spec: str | None, path: Path):
        self.name, self.spec, self.path = name, spec, path
        self.saved = False
        self.times: dict[str, list[tuple[float, float]]] = {
            "prefill": [],
            "prefill_first_token": [],
            "load": [],
            "load_first_token": [],
        }
        self.save_s = 0.0
        self.fresh_logits: torch.Tensor | None = None
        self.identical = True

    def prefill(self, model: Any, tokenizer: Any, ids: torch.Tensor, suffix: torch.Tensor) -> None:
        import safetensors.torch
        from transformers import DynamicCache

        from kvpack.cache.persist import prefix_cache

        start = _clock()
        if self.spec is None:
            cache: Any = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        else:
            cache = prefix_cache(model, ids, self.spec)
            self.name = cache.cache_config.spec
        prefill = _since(start)
        if not self.saved:
            save_start = time.perf_counter()
            if self.spec is None:
                self.path.write_bytes(safetensors.torch.save(_fp16_tensors(cache)))
            else:
                cache.save(self.path, model, ids, tokenizer)
            self.save_s, self.saved = time.perf_counter() - save_start, True
        start = _clock()
        logits = _first_token_logits(model, cache, suffix)
        first = _since(start)
        self.times["prefill"].append(prefill)
        self.times["prefill_first_token"].append((prefill[0] + first[0], prefill[1] + first[1]))
        if self.fresh_logits is None:
            self.fresh_logits = logits

    def load(self, model: Any, tokenizer: Any, suffix: torch.Tensor) -> None:
        import safetensors.torch
        from transformers import DynamicCache

        from kvpack.cache import KVPackCache

        start = _clock()
        if self.spec is None:
            tensors = safetensors.torch.load(self.path.read_bytes())
            cache: Any = DynamicCache(config=model.config)
            for idx in range(len(tensors) // 2):
                keys, values = tensors[f"layers.{idx}.keys"], tensors[f"layers.{idx}.values"]
                cache.update(keys.to(model.device, model.dtype), values.to(model.device, model.dtype), idx)
        else:
            cache = KVPackCache.load(self.path, model, tokenizer)
        self.times["load"].append(_since(start))
        logits = _first_token_logits(model, cache, suffix)
        self.times["load_first_token"].append(_since(start))
        if self.spec is not None:
            assert self.fresh_logits is not None  # prefilled (and saved) first
            self.identical = self.identical and torch.equal(logits, self.fresh_logits)

    def row(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from kvpack.cache import KVPackCache

        row: dict[str, Any] = {"cache": self.name, "file_bytes": self.path.stat().st_size, "save_s": self.save_s}
        for name, runs in self.times.items():
            row[f"{name}_s"] = min(wall for wall, _ in runs)
            row[f"{name}_cpu_s"] = min(cpu for _, cpu in runs)
            row[f"{name}_median_s"] = statistics.median(wall for wall, _ in runs)
            row[f"{name}_runs"] = len(runs)
        for clock in ("", "_cpu"):
            row[f"load_vs_prefill{clock}"] = row[f"prefill{clock}_s"] / row[f"load{clock}_s"]
            row[f"speedup_first_token{clock}"] = (
                row[f"prefill_first_token{clock}_s"] / row[f"load_first_token{clock}_s"]
            )
        if self.spec is not None:
            row["identical_first_token_logits"] = self.identical
            row["load_cold_s"] = None
            if _drop_from_page_cache(self.path):
                start = time.perf_counter()
                KVPackCache.load(self.path, model, tokenizer)
                row["load_cold_s"] = time.perf_counter() - start
        return row


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
        "prefill_repeats": args.prefill_repeats,
        "repeats": args.repeats,
        "load_average_1min": {"before": load_before[0]},
        "rows": [],
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        warm_up = all_ids[:, : min(256, contexts[0])]
        for case in [_Case(REFERENCE, None, Path(tmp) / "warm.st")] + [
            _Case(spec, spec, Path(tmp) / "warm.kvpc") for spec in specs
        ]:
            case.prefill(model, tokenizer, warm_up, warm_up[:, :4])
            case.load(model, tokenizer, warm_up[:, :4])
        for context in contexts:
            ids, suffix = all_ids[:, :context], all_ids[:, context : context + args.suffix]
            cases = [_Case(REFERENCE, None, Path(tmp) / f"fp16-{context}.safetensors")]
            cases += [_Case(spec, spec, Path(tmp) / f"{spec}-{context}.kvpc") for spec in specs]
            for repeat in range(args.prefill_repeats):
                for case in cases:
                    print(f"{context} tokens, prefill {repeat + 1}: {case.name} ...", file=sys.stderr, flush=True)
                    case.prefill(model, tokenizer, ids, suffix)
            print(f"{context} tokens: {args.repeats} loads of each ...", file=sys.stderr, flush=True)
            for _ in range(args.repeats):
                for case in cases:
                    case.load(model, tokenizer, suffix)
            reference_bytes = cases[0].path.stat().st_size
            for case in cases:
                row = case.row(model, tokenizer)
                row["size_vs_fp16_dump"] = reference_bytes / row["file_bytes"]
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
        f"torch thread(s), {result['machine']['device']}; 1-minute load average {load['before']:.1f} before, "
        f"{load['after']:.1f} after (a shared VM: other jobs ran beside this one)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- command: `{result['command']}`",
        f"- prefixes: the first N tokens of {result['data']}; then a {result['suffix_tokens']}-token suffix (the "
        f"question) gives the first generated token. Best of {result['prefill_repeats']} prefills and of "
        f"{result['repeats']} loads from the page cache (interleaved across caches; medians in the JSON), and one "
        "load after dropping the file's pages (cold); every kvpack load verifies the checksum and the model and "
        "tokenizer fingerprints. Times are wall-clock seconds, with this process's CPU seconds in parentheses (what "
        "the other jobs on the machine do not inflate).",
        "",
        "| prefix tokens | cache | file | vs fp16 dump | prefill s | save s | load s | load s (cold) | "
        "load vs prefill | prefill + 1st token s | load + 1st token s | speedup to 1st token | same logits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        kvpack = "load_cold_s" in row
        cells = [
            f"{row['context']:,}",
            row["cache"],
            f"{row['file_bytes'] / 1e6:,.1f} MB",
            f"{row['size_vs_fp16_dump']:.2f}x smaller" if kvpack else "1.00x",
            f"{row['prefill_s']:.2f} ({row['prefill_cpu_s']:.2f})",
            f"{row['save_s']:.3f}",
            f"{row['load_s']:.3f} ({row['load_cpu_s']:.3f})",
            f"{row['load_cold_s']:.3f}" if kvpack and row["load_cold_s"] is not None else "",
            f"{row['load_vs_prefill']:.0f}x ({row['load_vs_prefill_cpu']:.0f}x)",
            f"{row['prefill_first_token_s']:.2f} ({row['prefill_first_token_cpu_s']:.2f})",
            f"{row['load_first_token_s']:.3f} ({row['load_first_token_cpu_s']:.3f})",
            f"{row['speedup_first_token']:.0f}x ({row['speedup_first_token_cpu']:.0f}x)",
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
    parser.add_argument("--prefill-repeats", type=int, default=2, help="prefills timed per cache (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="loads timed per file (default 7)")
    parser.add_argument("--data", default=str(default_data_path()), help="text file (default: WikiText-2 test)")
    parser.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--tmp", default=None, help="directory for the files (default: the system's temporary one)")
    parser.add_argument("--json", default=str(DEFAULT_RESULTS), help="JSON path (.md beside it)")
    parser.set_defaults(func=cmd_persist)
