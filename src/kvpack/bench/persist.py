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

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvpack.cache.plan import context_limit
from kvpack.compat import cache_kwargs
from kvpack.harness.caches import load_timed_model
from kvpack.harness.results import format_bytes, markdown_page, markdown_table, provenance, timed
from kvpack.texts import default_data_path, load_tokens

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

    def __init__(self, spec: str | None, path: Path):
        """spec: a kvpack spec, or None for the fp16 dump."""
        self.name, self.spec, self.path = spec or REFERENCE, spec, path
        parts = ("prefill", "prefill_first_token", "load", "load_first_token")
        self.times: dict[str, list[tuple[float, float]]] = {part: [] for part in parts}
        self.save_s: float | None = None  # once saved
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
        if self.save_s is None and self.spec is None:
            _, self.save_s = timed(lambda: self.path.write_bytes(safetensors.torch.save(_fp16_tensors(cache))))
        elif self.save_s is None:
            _, self.save_s = timed(cache.save, self.path, model, ids, tokenizer)
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
                row["load_cold_s"] = timed(KVPackCache.load, self.path, model, tokenizer)[1]
        return row


def run_persist(
    caches: Sequence[str],
    contexts: Sequence[int],
    *,
    suffix: int = 16,
    prefill_repeats: int = 2,
    repeats: int = 7,
    data: str | Path | None = None,
    model_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    tmp: str | Path | None = None,
) -> dict[str, Any]:
    """Everything `kvpack bench persist` measures, as the JSON-ready result: for each prefix length of `contexts`
    (capped to fit the model) and each kvpack spec of `caches`, and for the fp16 dump, prefill + first token vs load +
    first token (`suffix` tokens after the prefix), files in `tmp` (default the system's temporary folder).
    data: the text (default WikiText-2 test)."""
    data = data or default_data_path()
    load_before = os.getloadavg()
    # As `kvpack generate`: the first token after a load reads the packed cache.
    model, tokenizer = load_timed_model(model_name, ["auto"], dtype=dtype, device=device)
    contexts = [min(c, context_limit(model.config) - suffix) for c in contexts]
    all_ids, data_sha = load_tokens(data, tokenizer, max(contexts) + suffix)
    all_ids = all_ids.to(model.device)
    result: dict[str, Any] = {
        **provenance("persist", model, model_name),
        "data": Path(data).name,
        "data_sha256": data_sha,
        "contexts": contexts,
        "suffix_tokens": suffix,
        "prefill_repeats": prefill_repeats,
        "repeats": repeats,
        "load_average_1min": {"before": load_before[0]},
        "rows": [],
    }
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        warm_up = all_ids[:, : min(256, contexts[0])]
        for case in [_Case(spec, Path(folder) / f"warm-{i}") for i, spec in enumerate([None, *caches])]:
            case.prefill(model, tokenizer, warm_up, warm_up[:, :4])
            case.load(model, tokenizer, warm_up[:, :4])
        for context in contexts:
            ids, question = all_ids[:, :context], all_ids[:, context : context + suffix]
            cases = [_Case(spec, Path(folder) / f"{context}-{i}") for i, spec in enumerate([None, *caches])]
            for repeat in range(prefill_repeats):
                for case in cases:
                    print(f"{context} tokens, prefill {repeat + 1}: {case.name} ...", file=sys.stderr, flush=True)
                    case.prefill(model, tokenizer, ids, question)
            print(f"{context} tokens: {repeats} loads of each ...", file=sys.stderr, flush=True)
            for _ in range(repeats):
                for case in cases:
                    case.load(model, tokenizer, question)
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
    header = ["prefix tokens", "cache", "file", "vs fp16 dump", "prefill s", "save s", "load s", "load s (cold)",
              "load vs prefill", "prefill + 1st token s", "load + 1st token s", "speedup to 1st token",
              "same logits"]  # fmt: skip
    rows = []
    for row in result["rows"]:
        kvpack = "load_cold_s" in row
        rows.append([
            f"{row['context']:,}",
            row["cache"],
            format_bytes(row["file_bytes"]),
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
        ])  # fmt: skip
    notes = [
        f"- 1-minute load average {load['before']:.1f} before, {load['after']:.1f} after (a shared VM: other jobs ran "
        "beside this one)",
        f"- prefixes: the first N tokens of {result['data']}; then a {result['suffix_tokens']}-token suffix (the "
        f"question) gives the first generated token. Best of {result['prefill_repeats']} prefills and of "
        f"{result['repeats']} loads from the page cache (interleaved across caches; medians in the JSON), and one "
        "load after dropping the file's pages (cold); every kvpack load verifies the checksum and the model and "
        "tokenizer fingerprints. Times are wall-clock seconds, with this process's CPU seconds in parentheses (what "
        "the other jobs on the machine do not inflate).",
    ]
    title = f"kvpack bench persist: {result['model']} ({result['dtype']})"
    return markdown_page(title, result, notes, markdown_table(header, rows))
