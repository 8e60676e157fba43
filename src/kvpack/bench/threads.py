"""`kvpack bench threads`: independent caches used from several threads at once, against the same work done
sequentially, on one shared model.

Each of `--workers` prompts (different lengths, cut from the example document) is generated greedily with its own
`KVPackCache`: first one after another, then all at once from a thread pool, started together, for `--rounds`
rounds. Reported per cache spec and path: whether every thread's tokens and logits were bit-identical to its
sequential run (the result that matters), and the wall time of both (threads share the machine's cores, so the
speedup says how much decoding overlapped, not that kvpack is faster). JSON is the source of truth; Markdown is made
from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kvpack.bench.compare import result_header
from kvpack.compat import cache_kwargs

DEFAULT_RESULTS = Path("benchmarks/results/concurrency.json")
DEFAULT_CACHES = "k8v8,k4v4,k4v4@dense,k2v2"


def _prompts(tokenizer: Any, workers: int, length: int) -> list[torch.Tensor]:
    text = Path(__file__).resolve().parents[3].joinpath("examples", "handbook.txt")
    source = text.read_text() if text.is_file() else "The lighthouse keeper wrote in the log every night. " * 200
    ids = tokenizer(source, return_tensors="pt").input_ids
    return [ids[:, 50 * i : 50 * i + length + 17 * i] for i in range(workers)]


def _generate(model: Any, ids: torch.Tensor, spec: str, backend: str, tokens: int, start: Any = None) -> Any:
    from kvpack.cache.cache import KVPackCache

    cache = KVPackCache(model, spec, backend=backend)
    if start is not None:
        start.wait()
    out = model.generate(
        ids,
        **cache_kwargs(model, cache),
        max_new_tokens=tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=model.config.eos_token_id,
    )
    packed = min(getattr(layer, "packed_length", 0) for layer in cache.layers)
    return out.sequences, torch.stack(out.logits), packed


def run_threads(args: argparse.Namespace) -> dict[str, Any]:
    from kvpack.attention.registry import prepare, use_kvpack_attention
    from kvpack.config import parse_spec
    from kvpack.models import load_model

    names = args.caches.split(",")
    for name in names:
        parse_spec(name.split("@")[0])  # a clear error for a bad spec, before the model loads
    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, verbose=True)
    prompts = _prompts(tokenizer, args.workers, args.prompt_tokens)
    result = result_header("threads", model, args.model)
    result.update(workers=args.workers, rounds=args.rounds, new_tokens=args.tokens, rows=[])
    result["prompt_tokens"] = [int(p.shape[1]) for p in prompts]
    for name in names:
        spec, backend = name.split("@") if "@" in name else (name, "auto")
        if backend == "dense":
            model.set_attn_implementation("sdpa")
        else:
            use_kvpack_attention(model)
            prepare(backend)
        print(
            f"{name}: {args.workers} prompts sequentially, then {args.rounds} x {args.workers} threads", file=sys.stderr
        )
        t0 = time.perf_counter()
        sequential = [_generate(model, ids, spec, backend, args.tokens) for ids in prompts]
        sequential_s = time.perf_counter() - t0
        identical, concurrent_s = True, []
        for _ in range(args.rounds):
            start = threading.Barrier(args.workers)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                futures = [pool.submit(_generate, model, ids, spec, backend, args.tokens, start) for ids in prompts]
                outputs = [future.result() for future in futures]
            concurrent_s.append(time.perf_counter() - t0)
            identical &= all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(sequential, outputs, strict=True)
            )
        result["rows"].append(
            {
                "cache": name,
                "identical": identical,
                "sequential_s": sequential_s,
                "concurrent_s": concurrent_s,
                "speedup": sequential_s / min(concurrent_s),
                "packed_tokens": [run[2] for run in sequential],
            }
        )
    model.set_attn_implementation("sdpa")
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Concurrency: {result['workers']} threads, each with its own cache, one shared model",
        "",
        f"- command: `{result['command']}`; {result['date']}; torch {result['versions']['torch']}, transformers "
        f"{result['versions']['transformers']}, {result['machine']['torch_threads']} torch thread(s) per op",
        f"- model: {result['model']} ({result['dtype']}); prompts of {', '.join(map(str, result['prompt_tokens']))} "
        f"tokens, {result['new_tokens']} new tokens each, greedy; {result['rounds']} concurrent rounds",
        "",
        "| cache | every thread bit-identical to its sequential run | packed tokens per prompt (first layer) "
        "| sequential s | concurrent s (best) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['cache']} | {'yes' if row['identical'] else 'NO'} | {', '.join(map(str, row['packed_tokens']))} | "
            f"{row['sequential_s']:.1f} | "
            f"{min(row['concurrent_s']):.1f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def cmd_threads(args: argparse.Namespace) -> int:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_threads(args)
    out.write_text(json.dumps(result, indent=2) + "\n")
    page = to_markdown(result)
    out.with_suffix(".md").write_text(page)
    print(page)
    print(f"wrote {out}, {out.with_suffix('.md')}", file=sys.stderr)
    return 0 if all(row["identical"] for row in result["rows"]) else 1


def add_parser(bench_subparsers: Any) -> None:
    """Register `kvpack bench threads` on `kvpack bench`'s subparsers."""
    parser = bench_subparsers.add_parser(
        "threads",
        help="several threads, each with its own cache, vs the same work sequentially",
        description="Generate from several prompts with one shared model, sequentially and then from concurrent "
        "threads (each with its own cache); check that every thread's tokens and logits are bit-identical. Writes "
        "JSON and Markdown.",
    )
    parser.add_argument("--caches", default=DEFAULT_CACHES, help=f"specs, @backend allowed (default {DEFAULT_CACHES})")
    parser.add_argument("--workers", type=int, default=4, help="threads (and prompts) (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="concurrent rounds (default 2)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per prompt (default 24)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens of the first prompt (default 256)")
    parser.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads per op (default 1)")
    parser.add_argument("--json", default=str(DEFAULT_RESULTS), help="JSON path (.md beside it)")
    parser.set_defaults(func=cmd_threads)
