"""`kvpack bench decode`: decode speed of the fused path against full-precision caches and the peers, in one run.

Two measurements, each side by side in one process:

1. Full-model decode: every cache is prefilled with the same random tokens to each context, then takes one timed
   single-token step in turn, round after round (`kvpack.bench.compare.decode_speed`). Reported: tokens/s, the
   ratio to `fp` (transformers' DynamicCache) and to `fp-prealloc` (a preallocated full-precision cache: the
   strongest fp baseline here), and the prefill time and its ratio to fp's.
2. Attention alone: one layer call of each backend, rotating over `layers` different layer caches (so the data
   comes from memory, not from a cache that sits in L3), at each context; reported as µs per call and GB/s of
   cache bytes read, against the read bandwidth of this machine measured in the same run (the physical limit of a
   memory-bound decode), and against fp32 SDPA over the same tokens.

JSON is the source of truth; Markdown and a PNG are made from it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvpack.bench.compare import decode_speed, interleaved, speed_columns
from kvpack.bench.report import tokens_per_s_lines
from kvpack.bench.synthetic import shaped_model
from kvpack.cache.plan import cache_shape, context_limit, flushed_tokens
from kvpack.errors import ConfigError
from kvpack.harness.caches import load_timed_model, parse_compared, prepare_timed_model, resolve_auto, uniform_spec
from kvpack.harness.results import figure, markdown_page, markdown_table, plot_lines, provenance, timed

GB = 1e9


def read_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> dict[str, float]:
    """This machine's memory bandwidth with torch's threads: a sum (read only) and a copy (read + write) of
    `n_bytes`, best of `repeats`, in GB/s."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        best_sum = min(best_sum, timed(src.sum)[1])
        best_copy = min(best_copy, timed(dst.copy_, src)[1])
    return {"read_gb_s": n_bytes / best_sum / GB, "copy_gb_s": 2 * n_bytes / best_copy / GB}


def layer_inputs(config: Any, spec: str, tokens: int, layers: int, seed: int) -> tuple[list[Any], list[Any], int]:
    """`layers` independent (AttentionInputs, fp32 keys/values) pairs of `tokens` tokens with the model's shapes."""
    from kvpack.attention.inputs import AttentionInputs
    from kvpack.quant.tensor import PackedTensor

    cache_config = uniform_spec(spec)
    shape = cache_shape(config)
    sinks = min(cache_config.sinks, tokens)
    packed = flushed_tokens(tokens - sinks, cache_config)  # what a streamed cache holds packed, after the sinks
    gen = torch.Generator().manual_seed(seed)
    inputs, dense = [], []

    def exact(x: torch.Tensor) -> torch.Tensor:  # the sinks, then the residual window
        return torch.cat([x[:, :, :sinks], x[:, :, sinks + packed :]], dim=2)

    for _ in range(layers):
        keys, values = (torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=gen) for _ in range(2))
        inputs.append(
            AttentionInputs(
                exact_keys=exact(keys),
                exact_values=exact(values),
                packed_keys=PackedTensor.quantize(keys[:, :, sinks : sinks + packed], cache_config.key),
                packed_values=PackedTensor.quantize(values[:, :, sinks : sinks + packed], cache_config.value),
                sink_len=sinks,
            )
        )
        dense.append((keys, values))
    return inputs, dense, packed


def attention_speed(
    config: Any,
    spec: str,
    contexts: list[int],
    backends: list[str],
    layers: int,
    calls: int,
    threads: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """µs per decode-attention call and GB/s of cache bytes read, per backend and context (and fp32 SDPA), at each of
    `threads` torch thread counts (default: the current one), restored afterwards."""
    current = torch.get_num_threads()
    rows = []
    try:
        for count in threads or [current]:
            torch.set_num_threads(count)
            rows += [
                {**row, "threads": count} for row in _attention_speed(config, spec, contexts, backends, layers, calls)
            ]
    finally:
        torch.set_num_threads(current)
    return rows


def _attention_speed(
    config: Any, spec: str, contexts: list[int], backends: list[str], layers: int, calls: int
) -> list[dict[str, Any]]:
    from kvpack.attention import cpu, op
    from kvpack.attention.inputs import AttentionInputs
    from kvpack.attention.registry import attend

    shape = cache_shape(config)
    scaling = shape.head_dim**-0.5
    rows = []
    for context in contexts:
        inputs, dense, packed = layer_inputs(config, spec, context, layers, seed=context)
        for layer in inputs:  # as a cache layer does: attend resolves its backend and constants once per layer
            layer.memo = {}
        query = torch.randn(1, shape.attention_heads, 1, shape.head_dim)
        nbytes = inputs[0].nbytes
        candidates: dict[str, tuple[Any, int]] = {}
        for backend in backends:

            def run(i: int, backend: str = backend, inputs: list[Any] = inputs, query: Any = query) -> Any:
                layer: AttentionInputs = inputs[i % len(inputs)]
                layer.backend = backend
                return attend(query, layer, None, scaling)

            candidates[f"kvpack {spec} ({backend})"] = (run, nbytes)

        if "cpu" in backends and cpu.extension().integer_products():
            # The operator alone (arguments prepared), with and without the integer products, side by side.
            operator = torch.ops.kvpack.packed_attention.default
            for integer in (True, False):
                prepared = [op.arguments(query, layer, None, scaling, None, integer) for layer in inputs]

                def direct(i: int, prepared: list[Any] = prepared, operator: Any = operator) -> Any:
                    return operator(*prepared[i % len(prepared)])

                products = "integer" if integer else "float"
                candidates[f"kvpack {spec} (cpu op, {products} products)"] = (direct, nbytes)

        def sdpa(i: int, dense: list[Any] = dense, query: Any = query) -> Any:
            keys, values = dense[i % len(dense)]
            return torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

        candidates["fp32 SDPA"] = (sdpa, dense[0][0].nbytes + dense[0][1].nbytes)
        # Interleaved like the full-model measurement, after untimed calls that build the kernels. Within a round each
        # kernel reads another layer (an offset of layers / kernels apart): had they all read layer i, every kernel
        # after the first would find that layer's data still in cache from the kernel before it.
        stride = max(1, layers // len(candidates))
        timings = interleaved(
            {name: _offset(fn, k * stride) for k, (name, (fn, _)) in enumerate(candidates.items())},
            calls,
            warmup=min(layers, 3),
        )
        sdpa_us = timings["fp32 SDPA"] / calls * 1e6
        for name, (_, n_bytes) in candidates.items():
            us = timings[name] / calls * 1e6
            rows.append({
                "context": context, "kernel": name, "us_per_call": us, "bytes_read": n_bytes,
                "gb_s": n_bytes / (us * 1e-6) / GB, "speed_vs_sdpa": sdpa_us / us, "packed_tokens": packed,
            })  # fmt: skip
    return rows


def _offset(fn: Any, offset: int) -> Any:
    """`fn` called with its index shifted by `offset`."""
    return lambda i: fn(i + offset)


def layer_step_overhead(config: Any, spec: str, context: int, layers: int) -> dict[str, float]:
    """What a fused decode step of one layer costs around the CPU kernel, over `layers` layers rotating, a block's
    worth of steps each (so that each flushes a block once), µs:

    update_us: `PackedLayer.fused_update` per step (its flush included: `flush_us` per flush), mean over the steps;
    dispatch_us: `attend` (the backend's resolution, the operator's arguments and dispatch) minus the kernel called
        directly, both as medians over the steps; the direct calls rotate over the layers as the steps do, so that
        both read data as cold (a direct call right after `attend` on the same data would find it in cache);
    kernel_us: the kernel alone, median; around_us: update_us + dispatch_us, what the step costs beyond the kernel.
    """
    from kvpack.attention import cpu, op
    from kvpack.attention.inputs import INPUTS_ATTRIBUTE
    from kvpack.attention.registry import attend
    from kvpack.cache.layer import PackedLayer

    cache_config, shape = uniform_spec(spec), cache_shape(config)
    kernel, scaling, clock = cpu.extension(), shape.head_dim**-0.5, time.perf_counter
    gen = torch.Generator().manual_seed(context)
    stack = [PackedLayer(cache_config, i) for i in range(layers)]
    for layer in stack:
        layer.append(*(torch.randn(1, shape.kv_heads, context, shape.head_dim, generator=gen) for _ in "kv"))
    query = torch.randn(1, shape.attention_heads, 1, shape.head_dim, generator=gen)
    new = [torch.randn(1, shape.kv_heads, 1, shape.head_dim, generator=gen) for _ in range(16)]
    updates, flushes, attends, kernels = [], [], [], []
    arguments: list[tuple[Any, ...]] = []
    for i in range(layers * (cache_config.block_tokens + 1)):  # the first round untimed: it warms every layer
        layer = stack[i % layers]
        packed = layer.packed_length
        start = clock()
        keys, _ = layer.fused_update(new[i % 16], new[(i + 1) % 16], "cpu")
        updated = clock()
        inputs = getattr(keys, INPUTS_ATTRIBUTE)
        attend(query, inputs, None, scaling)
        attended = clock()
        if i < layers:
            arguments.append(op.arguments(query, inputs, None, scaling, None, cpu.integer_products))
        else:
            updates.append(updated - start)
            if layer.packed_length != packed:
                flushes.append(updated - start)
            attends.append(attended - updated)
    for i in range(layers * cache_config.block_tokens):
        start = clock()
        kernel.packed_attention(*arguments[i % layers])
        kernels.append(clock() - start)
    us = 1e6
    update_us, kernel_us = statistics.mean(updates) * us, statistics.median(kernels) * us
    dispatch_us = statistics.median(attends) * us - kernel_us
    return {
        "context": context, "update_us": update_us, "flush_us": statistics.mean(flushes) * us if flushes else 0.0,
        "dispatch_us": dispatch_us, "kernel_us": kernel_us, "around_us": update_us + dispatch_us,
    }  # fmt: skip


def run_decode(
    caches: Sequence[str],
    contexts: Sequence[int],
    *,
    steps: int = 16,
    profile_steps: int = 4,
    backends: Sequence[str] = (),
    spec: str = "k4v4",
    layers: int = 30,
    calls: int = 60,
    kernel_threads: Sequence[int] = (),
    model_name: str | None = None,
    model_shape: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict[str, Any]:
    """Everything `kvpack bench decode` measures, as the JSON-ready result: full-model decode of each cache (fp
    added first when missing) at each context (capped to fit the model), then the attention kernels of `backends`
    alone on `spec` (none when empty) at each of `kernel_threads`, and what a fused layer step costs around the CPU
    kernel. model_shape: a random-weight model of that shape (`synthetic.MODEL_SHAPES`) instead of `model_name`,
    its caches filled with random keys and values (`compare.fill_random`) instead of a prefill."""
    specs = parse_compared(caches)
    backends_used = [cache.backend for cache in specs]
    if model_shape is None:
        model, tokenizer = load_timed_model(model_name, backends_used, dtype=dtype, device=device)
        resolve_auto(specs, model, tokenizer)
    else:
        if auto := [spec.name for spec in specs if spec.auto is not None]:
            raise ConfigError(f"{auto[0]} calibrates on a trained model's text: not on a random-weight --model-shape.")
        model = prepare_timed_model(shaped_model(model_shape, dtype), backends_used)
    contexts = [min(c, context_limit(model.config) - steps - 3) for c in contexts]
    result: dict[str, Any] = {
        **provenance("decode", model, model_shape or model_name),
        "model_shape": model_shape,
        "contexts": contexts,
        "steps": steps,
        "bandwidth": read_bandwidth(),
        "rows": [],
    }
    entries = [(cache.name, model, cache) for cache in specs]
    speed = {}
    for context in contexts:
        print(f"Decode at {context} tokens: {len(specs)} caches, {steps} interleaved steps ...", file=sys.stderr)
        speed[context] = decode_speed(
            entries, context, steps, profile_steps=profile_steps, random_fill=model_shape is not None
        )
    for cache in specs:
        row: dict[str, Any] = {"cache": cache.name}
        for context, by_cache in speed.items():
            measured = by_cache[cache.name]
            row.update(speed_columns(by_cache, cache.name, context))
            if "fp-prealloc" in by_cache:
                prealloc = by_cache["fp-prealloc"]["tokens_per_s"]
                row[f"speed_vs_fp_prealloc@{context}"] = measured["tokens_per_s"] / prealloc
            row[f"prefill_vs_fp@{context}"] = measured["prefill_s"] / by_cache["fp"]["prefill_s"]
            if "profile_ms" in measured:
                row[f"profile_ms@{context}"] = measured["profile_ms"]
        result["rows"].append(row)
    if backends:
        print(f"Attention alone: {', '.join(backends)} and fp32 SDPA over {layers} layers ...", file=sys.stderr)
        result["attention"] = attention_speed(
            model.config, spec, contexts, list(backends), layers, calls, kernel_threads
        )
        result["attention_spec"] = spec
    if "cpu" in backends:
        from kvpack.attention import cpu

        result["integer_products"] = {"built": bool(cpu.extension().integer_products()), "on": cpu.integer_products}
        print(f"A fused layer step around the CPU kernel, {spec} ...", file=sys.stderr)
        result["layer_step"] = [layer_step_overhead(model.config, spec, context, layers) for context in contexts]
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The decode result as a Markdown page."""
    contexts, bandwidth = result["contexts"], result["bandwidth"]
    header = ["cache"]
    filled = "random fill" if result.get("model_shape") else "prefill"  # --model-shape fills caches, no prefill
    for c in contexts:
        header += [f"tok/s @{c}", f"vs fp @{c}", f"vs fp-prealloc @{c}", f"{filled} s @{c} (vs fp)"]
    rows = []
    for row in result["rows"]:
        cells = [row["cache"]]
        for c in contexts:
            prealloc = row.get(f"speed_vs_fp_prealloc@{c}")
            cells += [
                f"{row[f'tokens_per_s@{c}']:.2f}",
                f"{row[f'speed_vs_fp@{c}']:.2f}x",
                "" if prealloc is None else f"{prealloc:.2f}x",
                f"{row[f'prefill_s@{c}']:.2f} ({row[f'prefill_vs_fp@{c}']:.2f}x)",
            ]
        rows.append(cells)
    notes = [
        f"- memory bandwidth measured in the same run: read {bandwidth['read_gb_s']:.1f} GB/s, copy (read + write) "
        f"{bandwidth['copy_gb_s']:.1f} GB/s"
    ]
    lines = [
        f"## Full-model decode ({result['steps']} single-token steps per cache and context, interleaved)",
        "",
        *markdown_table(header, rows),
        *_profile_markdown(result),
    ]
    if "attention" in result:
        threads = any("threads" in r for r in result["attention"])  # (results before 2026-12-06 have one count)
        header = ["context", "kernel", "µs per call", "bytes read", "GB/s", "% of read bandwidth", "vs fp32 SDPA"]
        rows = [
            [r["context"], r["kernel"], f"{r['us_per_call']:.0f}", f"{r['bytes_read']:,}", f"{r['gb_s']:.1f}",
             f"{100 * r['gb_s'] / bandwidth['read_gb_s']:.0f}%", f"{r['speed_vs_sdpa']:.2f}x"]
            + ([r["threads"]] if threads else [])
            for r in result["attention"]
        ]  # fmt: skip
        lines += [
            "",
            f"## Attention alone (one decode call, {result['attention_spec']}, rotating over layer caches)",
            "",
            *markdown_table(header + (["threads"] if threads else []), rows),
        ]
        integer = result.get("integer_products")
        if integer and integer["built"]:
            lines += [
                "",
                "`cpu op` rows: the operator called with prepared arguments, with the CPU kernel's integer products "
                "(AVX-512 VNNI; query and weights rounded to two 8-bit digits per block) and without; the `cpu` row "
                f"goes through `attend`, integer products {'on' if integer['on'] else 'off'}, as the caches above.",
            ]
    if "layer_step" in result:
        parts = ("update_us", "flush_us", "dispatch_us", "around_us", "kernel_us")
        rows = [[r["context"], *(f"{r[part]:.1f}" for part in parts)] for r in result["layer_step"]]
        lines += [
            "",
            f"## One layer's fused decode step around the CPU kernel ({result['attention_spec']})",
            "",
            "µs per layer and step, a block's worth of steps per layer: the cache's `fused_update` (mean; each "
            "block's flush, which quantizes it, included), the dispatch (`attend` minus the kernel called directly, "
            "both medians, each rotating over the layers), their sum, and the kernel alone (median).",
            "",
            *markdown_table(["context", "update", "a flush", "dispatch", "around the kernel", "kernel"], rows),
        ]
    return markdown_page(f"kvpack bench decode: {result['model']} ({result['dtype']})", result, notes, lines)


def _profile_markdown(result: dict[str, Any]) -> list[str]:
    """Where a step's time goes, per cache and context, and the most any cache could gain over fp there."""
    contexts = [c for c in result["contexts"] if any(f"profile_ms@{c}" in row for row in result["rows"])]
    if not contexts:
        return []
    lines = [
        "",
        "## Where a decode step's time goes (ms per step, instrumented steps after the timed ones)",
        "",
        "Linear layers (output head included), the attention function, the cache's `update`, and the rest (norms, "
        "rotary embedding, activations, Python). The bound is fp's step over fp's step without its attention and "
        "cache update: the speedup over fp of a cache whose attention and update cost nothing.",
        "",
    ]
    parts = ("linear", "attention", "cache_update", "other", "step")
    rows = [
        [context, row["cache"], *(f"{row[f'profile_ms@{context}'][part]:.1f}" for part in parts)]
        for context in contexts
        for row in result["rows"]
        if f"profile_ms@{context}" in row
    ]
    lines += markdown_table(["context", "cache", "linear", "attention", "cache update", "other", "step"], rows)
    bounds = []
    for context in contexts:
        fp = next((row.get(f"profile_ms@{context}") for row in result["rows"] if row["cache"] == "fp"), None)
        if fp is not None:
            floor = fp["step"] - fp["attention"] - fp["cache_update"]
            bounds.append(f"{fp['step'] / floor:.2f}x @{context}")
    if bounds:
        lines += ["", "Bound on any cache's speedup over fp (free attention and update): " + ", ".join(bounds) + "."]
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Decode tokens/s vs context per cache, and attention µs per call vs context per kernel."""
    kernels: dict[str, tuple[list[float], list[float]]] = {}
    for row in result.get("attention", []):
        contexts, us = kernels.setdefault(row["kernel"], ([], []))
        contexts.append(row["context"])
        us.append(row["us_per_call"])
    with figure(path, f"{result['model']}: decode, {result['date'][:10]}") as (left, right):
        plot_lines(left, tokens_per_s_lines(result), "context (tokens)", "decode tokens/s")
        plot_lines(right, kernels, "context (tokens)", "µs per attention call")
        right.set_yscale("log")
