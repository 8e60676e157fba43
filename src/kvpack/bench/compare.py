"""`kvpack compare`: quality, memory and decode speed of several caches, side by side, in one run.

JSON is the source of truth (model, data hash, machine, versions, date, command); `kvpack report` turns it
into Markdown and plots.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvpack.cache.plan import cache_shape
from kvpack.compat import cache_kwargs
from kvpack.errors import ConfigError
from kvpack.eval.perplexity import stream
from kvpack.harness.caches import (
    CacheSpec,
    cache_nbytes,
    load_timed_model,
    make_cache,
    parse_compared,
    prefill,
    resolve_auto,
)
from kvpack.harness.results import display_path, provenance
from kvpack.texts import default_data_path, load_tokens

DEFAULT_CACHES = "fp,k8v8,k4v4,k4v2,k2v2,quanto-int4,quanto-int2,hqq-int8,hqq-int4-axis1"


def interleaved(calls: dict[str, Callable[[int], object]], rounds: int, warmup: int = 0) -> dict[str, float]:
    """Seconds each of `calls` took over `rounds` timed rounds, after `warmup` untimed ones. Every round calls each
    once, with the round's index (warm-up rounds counted), in an order that rotates each round, so that drift in the
    machine's speed affects all alike."""
    elapsed = dict.fromkeys(calls, 0.0)
    names = list(calls)
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name](index)
            if index >= warmup:
                elapsed[name] += time.perf_counter() - start
    return elapsed


def speed_columns(by_key: dict[str, dict[str, Any]], key: str, context: int) -> dict[str, Any]:
    """A row's columns at `context` from `decode_speed`'s measurements (`by_key`, fp's included): tokens/s and its
    ratio to fp's, prefill seconds and cache bytes."""
    measured = by_key[key]
    return {
        f"tokens_per_s@{context}": measured["tokens_per_s"],
        f"speed_vs_fp@{context}": measured["tokens_per_s"] / by_key["fp"]["tokens_per_s"],
        f"prefill_s@{context}": measured["prefill_s"],
        f"cache_bytes@{context}": int(measured["cache_bytes"]),
    }


def decode_speed(
    entries: list[tuple[str, Any, CacheSpec]],
    context: int,
    steps: int,
    warmup: int = 2,
    seed: int = 0,
    profile_steps: int = 0,
    random_fill: bool = False,
) -> dict[str, Any]:
    """Single-token decode steps once each cache holds `context` tokens, interleaved across caches.

    entries: `(key, model, spec)`; the models may differ (e.g. in weight format). Every cache is prefilled with
    the same random tokens (after an untimed short prefill and step with each cache type, so that first-use costs
    such as a peer's kernel build stay out of the timings); then, round after round, each cache takes one timed
    step (the order rotates each round), so drift in machine speed affects all caches alike.
    random_fill: fill the caches with the same random keys and values instead (`fill_random`): what a long context
    on a large model takes on CPU, where its prefill would take hours; decode steps do the same work either way.
    Returns, per key: tokens/s, prefill (or fill) seconds and the cache's bytes after it; with `profile_steps`,
    also `profile_ms`: where the time of a step goes (see `step_profile`), from that many more steps, untimed
    above (the instrumentation costs a little).
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size for _, model, _ in entries)
    ids = torch.randint(100, vocab - 100, (1, context), generator=generator)
    caches: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}

    def fill(model: Any, spec: CacheSpec, cache: Any, tokens: int) -> None:
        if random_fill:
            fill_random(cache, model.config, tokens, spec.feed_first_tokens_together, seed)
        else:
            prefill(model, ids[:, :tokens].to(model.device), spec, cache)

    with torch.no_grad():
        for _, model, spec in entries:  # first use of a cache type (a peer's kernel build, lazy imports): untimed
            warm = make_cache(spec, model.config)
            fill(model, spec, warm, min(context, 256))
            model(ids[:, -1:].to(model.device), **cache_kwargs(model, warm), use_cache=True)
    for key, model, spec in entries:
        cache = make_cache(spec, model.config)
        start = time.perf_counter()
        fill(model, spec, cache, context)
        out[key] = {"prefill_s": time.perf_counter() - start, "cache_bytes": float(cache_nbytes(cache))}
        caches[key] = (model, cache)
    token = ids[:, -1:]

    def step(model: Any, cache: Any) -> Callable[[int], object]:
        return lambda _: model(token.to(model.device), **cache_kwargs(model, cache), use_cache=True)

    with torch.no_grad():
        elapsed = interleaved({key: step(*caches[key]) for key in caches}, steps, warmup)
    for key in caches:
        out[key]["tokens_per_s"] = steps / elapsed[key]
        if profile_steps:
            model, cache = caches[key]
            out[key]["profile_ms"] = step_profile(model, cache, token, profile_steps)
    return out


def fill_random(cache: Any, model_config: Any, tokens: int, first: int = 0, seed: int = 0, chunk: int = 4096) -> None:
    """Store `tokens` random keys and values (standard normal, the same for every cache with the same `seed`) in every
    cached layer of `cache`, `chunk` tokens per `update` (`first` tokens in the first one, as `prefill` feeds a peer
    that needs it)."""
    shape = cache_shape(model_config)
    generator = torch.Generator().manual_seed(seed)
    bounds = sorted({0, min(first, tokens), *range(first, tokens, chunk), tokens})
    with torch.no_grad():
        for layer, (kind, _) in enumerate(shape.plan):
            if kind == "dummy":
                continue
            keys, values = (torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=generator) for _ in "kv")
            for start, end in itertools.pairwise(bounds):
                cache.update(keys[:, :, start:end], values[:, :, start:end], layer)


def step_profile(model: Any, cache: Any, token: torch.Tensor, steps: int) -> dict[str, float]:
    """Milliseconds per decode step spent in the linear layers (output head included), in the attention function,
    in the cache's `update`, and in everything else (norms, rotary, activations, Python), over `steps` steps.

    Wall-clock timers around each call (hooks on every `nn.Linear`, a wrapper of the attention function the model
    uses and of `cache.update`); the instrumentation's own cost lands in the parts it wraps.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    spent = {"linear": 0.0, "attention": 0.0, "cache_update": 0.0}
    clock = time.perf_counter

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += clock() - start

        return wrapper

    started: dict[int, float] = {}

    def before(module: Any, _: Any) -> None:
        started[id(module)] = clock()

    def after(module: Any, _: Any, __: Any) -> None:
        spent["linear"] += clock() - started.pop(id(module))

    text = model.config.get_text_config(decoder=True)
    implementation = text._attn_implementation
    attention = ALL_ATTENTION_FUNCTIONS.get(implementation)
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    if attention is not None:
        AttentionInterface.register(implementation, timed("attention", attention))
    cache.update = timed("cache_update", cache.update)
    total = 0.0
    try:
        with torch.no_grad():
            for _ in range(steps):
                start = clock()
                model(token.to(model.device), **cache_kwargs(model, cache), use_cache=True)
                total += clock() - start
    finally:
        for hook in hooks:
            hook.remove()
        if attention is not None:
            AttentionInterface.register(implementation, attention)
        del cache.update
    # The attention function calls nothing of the cache; `update` runs inside the attention module, not inside
    # the attention function, so the parts do not overlap.
    profile = {part: 1e3 * seconds / steps for part, seconds in spent.items()}
    profile["other"] = 1e3 * total / steps - sum(profile.values())
    profile["step"] = 1e3 * total / steps
    return profile


def row_key(weights: str, cache: str) -> str:
    """The name of a row: the cache's, prefixed with its weight format when the weights are quantized."""
    return cache if weights == "fp" else f"{weights}:{cache}"


_SAME_RUN = ("model", "dtype")


def _resumable_rows(earlier: dict[str, Any], result: dict[str, Any], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The rows of `earlier` (a compare result) whose row keys are `wanted` (fp never: it is the reference streamed
    again), each with `measured` (its date) added, once `earlier` is shown to be of the same run as `result` (model,
    dtype, text, tokens and weight formats)."""
    differences = [name for name in _SAME_RUN if earlier.get(name) != result[name]]
    data, earlier_data = result["data"], earlier.get("data", {})
    differences += [f"data {name}" for name in ("sha256", "tokens", "mode") if earlier_data.get(name) != data[name]]
    if set(earlier.get("weights", {})) != set(result["weights"]):
        differences.append("weight formats")
    if differences:
        raise ConfigError(f"cannot resume from a compare run that differs in {', '.join(differences)}")
    measured = earlier.get("date")
    kept = {}
    for row in earlier.get("rows", []):  # (speed columns are measured side by side in each run: not kept)
        key = row_key(row["weights"], row["cache"])
        if key in wanted and key != "fp":
            quality = {name: value for name, value in row.items() if "@" not in name}
            kept[key] = {**quality, "measured": row.get("measured", measured)}
    return kept


def run_compare(
    caches: Sequence[str],
    *,
    tokens: int = 2048,
    data: str | Path | None = None,
    model_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    weights: Sequence[str] = ("fp",),
    contexts: Sequence[int] = (),
    steps: int = 16,
    checkpoint: Callable[[dict[str, Any]], object] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything `kvpack compare` measures, as the JSON-ready result.

    caches: cache names (`kvpack.harness.caches`); fp is added first when missing (the reference for ΔPPL, KL and
    top-1). tokens of `data` (default WikiText-2 test) are streamed through each; then decode speed is measured at
    each of `contexts` (none: quality only, as `kvpack ppl`) over `steps` steps. weights: formats among fp, int8 and
    int4; every cache runs with each, and the reference is always fp weights with the fp cache. checkpoint: called
    with the partial result (`"complete": False`) after each streamed run, so a long run can be inspected, and is not
    lost, before it ends. resume: an earlier result (finished or not) of the same model, dtype, text, tokens and
    weight formats (`ConfigError` otherwise): its rows of the caches asked for again are kept as they are (each
    marked with the date it was measured) and only the other caches are streamed; fp is always streamed again, as the
    reference the others need.
    """
    from kvpack.weights import check_weights, weight_nbytes

    data = data or default_data_path()
    specs = parse_compared(caches)  # before the model loads: a missing peer fails in seconds, not minutes
    weight_formats = ["fp", *(w for w in dict.fromkeys(weights) if w != "fp")]  # the reference has fp weights
    for name in weight_formats:
        check_weights(name)
    backends = [spec.backend for spec in specs]
    models = {}
    for name in weight_formats:
        models[name], tokenizer = load_timed_model(model_name, backends, dtype=dtype, device=device, weights=name)
    model = models["fp"]
    resolve_auto(specs, model, tokenizer)  # (chosen on the fp-weights model, used with every weight format)
    ids, data_sha256 = load_tokens(data, tokenizer, tokens)

    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        **provenance("compare", model, model_name),
        "complete": False,
        "weights": {name: weight_nbytes(m) for name, m in models.items()},
        "data": {"path": display_path(data), "sha256": data_sha256, "tokens": tokens, "mode": "streamed"},
        "contexts": [],
        "rows": rows,
    }
    runs = [(fmt, spec) for fmt in weight_formats for spec in specs]
    wanted = {row_key(fmt, spec.name) for fmt, spec in runs}
    kept = _resumable_rows(resume, result, wanted) if resume is not None else {}
    if kept:
        print(f"Keeping {len(kept)} rows measured before: {', '.join(kept)}", file=sys.stderr)
    print(f"Streaming {tokens} tokens through each of {len(runs) - len(kept)} caches ...", file=sys.stderr)
    reference, ref_logprobs = stream(model, ids, specs[0], keep_logprobs=True)
    by_key = {"fp": reference}
    for fmt, spec in runs:
        key = row_key(fmt, spec.name)
        if key in kept:
            rows.append(kept[key])
            continue
        if key != "fp":
            if checkpoint is not None:
                checkpoint(result)
            by_key[key], _ = stream(models[fmt], ids, spec, reference_logprobs=ref_logprobs, label=key)
            print(f"  {key}: PPL {by_key[key].perplexity:.3f}", file=sys.stderr)
        row = by_key[key].summary(reference)
        row.update(cache=spec.name, weights=fmt, weight_bytes=result["weights"][fmt])
        if spec.profile is not None:  # the table's label is short; the JSON keeps the file and the full spec
            # (an auto-<bits> profile lives in the user's profile store: its file name, not this machine's layout)
            profile = f"profile store: {Path(spec.profile).name}" if spec.auto is not None else spec.profile
            row.update(profile=profile, spec=spec.config().spec, bits_per_value=spec.bits_per_value())
        elif spec.peer.get("backend") == "tqai":  # nominal bits depend on the head dim
            row["bits_per_value"] = spec.bits_per_value(cache_shape(model.config).head_dim)
        if fmt != "fp":
            same_cache = next(r["ppl"] for r in rows if (r["weights"], r["cache"]) == ("fp", spec.name))
            row["delta_ppl_vs_fp_weights_pct"] = 100 * (by_key[key].perplexity / same_cache - 1)
        rows.append(row)
    if checkpoint is not None:
        checkpoint(result)
    del ref_logprobs

    entries = [(row_key(fmt, spec.name), models[fmt], spec) for fmt, spec in runs]
    speed = {}
    for context in contexts:
        print(f"Decode speed at {context} tokens ({steps} interleaved steps) ...", file=sys.stderr)
        speed[context] = decode_speed(entries, context, steps)
    element_size = torch.finfo(model.dtype).bits // 8
    for row in rows:
        for context, by_cache in speed.items():
            row.update(speed_columns(by_cache, row_key(row["weights"], row["cache"]), context))
            cache_bytes = row[f"cache_bytes@{context}"]
            row[f"vs_fp16@{context}"] = by_cache["fp"]["cache_bytes"] * 2 / element_size / cache_bytes
            row[f"total_bytes@{context}"] = row["weight_bytes"] + cache_bytes
    result.update(contexts=list(contexts), complete=True)
    return result
