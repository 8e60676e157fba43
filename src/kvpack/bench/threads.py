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

import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kvpack.compat import cache_kwargs
from kvpack.harness.results import markdown_page, markdown_table, provenance


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


def run_threads(
    caches: Sequence[str],
    *,
    workers: int = 4,
    rounds: int = 2,
    tokens: int = 24,
    prompt_tokens: int = 256,
    model_name: str | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Everything `kvpack bench threads` measures, as the JSON-ready result: per cache (a spec, `@backend` allowed),
    `workers` prompts generated sequentially, then `rounds` times from as many threads at once."""
    from kvpack.attention.registry import prepare, use_kvpack_attention
    from kvpack.config import parse_spec
    from kvpack.models import load_model

    for name in caches:
        parse_spec(name.split("@")[0])  # a clear error for a bad spec, before the model loads
    model, tokenizer = load_model(model_name, dtype=dtype, verbose=True)
    prompts = _prompts(tokenizer, workers, prompt_tokens)
    result = provenance("threads", model, model_name)
    result.update(workers=workers, rounds=rounds, new_tokens=tokens, rows=[])
    result["prompt_tokens"] = [int(p.shape[1]) for p in prompts]
    for name in caches:
        spec, backend = name.split("@") if "@" in name else (name, "auto")
        if backend == "dense":
            model.set_attn_implementation("sdpa")
        else:
            use_kvpack_attention(model)
            prepare(backend)
        print(f"{name}: {workers} prompts sequentially, then {rounds} x {workers} threads", file=sys.stderr)
        t0 = time.perf_counter()
        sequential = [_generate(model, ids, spec, backend, tokens) for ids in prompts]
        sequential_s = time.perf_counter() - t0
        identical, concurrent_s = True, []
        for _ in range(rounds):
            start = threading.Barrier(workers)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(_generate, model, ids, spec, backend, tokens, start) for ids in prompts]
                outputs = [future.result() for future in futures]
            concurrent_s.append(time.perf_counter() - t0)
            identical &= all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(sequential, outputs, strict=True)
            )
        result["rows"].append({
            "cache": name, "identical": identical, "sequential_s": sequential_s, "concurrent_s": concurrent_s,
            "speedup": sequential_s / min(concurrent_s), "packed_tokens": [run[2] for run in sequential],
        })  # fmt: skip
    model.set_attn_implementation("sdpa")
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The threads result as a Markdown page."""
    header = ["cache", "every thread bit-identical to its sequential run", "packed tokens per prompt (first layer)",
              "sequential s", "concurrent s (best)", "speedup"]  # fmt: skip
    rows = [
        [row["cache"], "yes" if row["identical"] else "NO", ", ".join(map(str, row["packed_tokens"])),
         f"{row['sequential_s']:.1f}", f"{min(row['concurrent_s']):.1f}", f"{row['speedup']:.2f}x"]
        for row in result["rows"]
    ]  # fmt: skip
    setup = [
        f"- model: {result['model']} ({result['dtype']}); prompts of {', '.join(map(str, result['prompt_tokens']))} "
        f"tokens, {result['new_tokens']} new tokens each, greedy; {result['rounds']} concurrent rounds"
    ]
    title = f"Concurrency: {result['workers']} threads, each with its own cache, one shared model"
    return markdown_page(title, result, setup, markdown_table(header, rows))
