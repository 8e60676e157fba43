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

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvpack.bench.compare import decode_speed
from kvpack.cache.plan import cache_shape, context_limit, flushed_tokens
from kvpack.harness.caches import parse_cache_name, require_packages
from kvpack.harness.results import markdown_table, provenance, provenance_lines

GB = 1e9


def read_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> dict[str, float]:
    """This machine's memory bandwidth with torch's threads: a sum (read only) and a copy (read + write) of
    `n_bytes`, best of `repeats`, in GB/s."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best_sum = min(best_sum, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    return {"read_gb_s": n_bytes / best_sum / GB, "copy_gb_s": 2 * n_bytes / best_copy / GB}


def _layer_inputs(config: Any, spec: str, tokens: int, layers: int, seed: int) -> tuple[list[Any], list[Any], int]:
    """`layers` independent (AttentionInputs, fp32 keys/values) pairs of `tokens` tokens with the model's shapes."""
    from kvpack.attention.inputs import AttentionInputs
    from kvpack.config import parse_spec
    from kvpack.errors import ConfigError
    from kvpack.quant.tensor import PackedTensor

    cache_config = parse_spec(spec)
    if cache_config.layer_bits:
        raise ConfigError(f"{spec}: per-layer bits (-l...) are not supported by this benchmark; give a uniform spec.")
    shape = cache_shape(config)
    packed = flushed_tokens(tokens, cache_config)
    gen = torch.Generator().manual_seed(seed)
    inputs, dense = [], []
    for _ in range(layers):
        keys, values = (torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=gen) for _ in range(2))
        inputs.append(
            AttentionInputs(
                exact_keys=keys[:, :, packed:].contiguous(),
                exact_values=values[:, :, packed:].contiguous(),
                packed_keys=PackedTensor.quantize(keys[:, :, :packed], cache_config.key),
                packed_values=PackedTensor.quantize(values[:, :, :packed], cache_config.value),
                sink_len=0,
            )
        )
        dense.append((keys, values))
    return inputs, dense, packed


def attention_speed(
    config: Any, spec: str, contexts: list[int], backends: list[str], layers: int, calls: int
) -> list[dict[str, Any]]:
    """µs per decode-attention call and GB/s of cache bytes read, per backend and context (and fp32 SDPA)."""
    from kvpack.attention.inputs import AttentionInputs
    from kvpack.attention.registry import attend

    shape = cache_shape(config)
    scaling = shape.head_dim**-0.5
    rows = []
    for context in contexts:
        inputs, dense, packed = _layer_inputs(config, spec, context, layers, seed=context)
        query = torch.randn(1, shape.attention_heads, 1, shape.head_dim)
        packed_bytes = sum(t.nbytes for t in (inputs[0].packed_keys, inputs[0].packed_values) if t is not None)
        exact_bytes = inputs[0].exact_keys.nbytes + inputs[0].exact_values.nbytes
        candidates: dict[str, tuple[Any, int]] = {}
        for backend in backends:

            def run(i: int, backend: str = backend, inputs: list[Any] = inputs, query: Any = query) -> Any:
                layer: AttentionInputs = inputs[i]
                layer.backend = backend
                return attend(query, layer, None, scaling)

            candidates[f"kvpack {spec} ({backend})"] = (run, packed_bytes + exact_bytes)

        def sdpa(i: int, dense: list[Any] = dense, query: Any = query) -> Any:
            keys, values = dense[i]
            return torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

        candidates["fp32 SDPA"] = (sdpa, dense[0][0].nbytes + dense[0][1].nbytes)
        for fn, _ in candidates.values():
            for i in range(min(layers, 3)):
                fn(i)  # warm up (and build the kernels)
        timings = dict.fromkeys(candidates, 0.0)
        for call in range(calls):
            for name, (fn, _) in candidates.items():  # interleaved, like the full-model measurement
                start = time.perf_counter()
                fn(call % layers)
                timings[name] += time.perf_counter() - start
        sdpa_us = timings["fp32 SDPA"] / calls * 1e6
        for name, (_, n_bytes) in candidates.items():
            us = timings[name] / calls * 1e6
            rows.append({
                "context": context, "kernel": name, "us_per_call": us, "bytes_read": n_bytes,
                "gb_s": n_bytes / (us * 1e-6) / GB, "speed_vs_sdpa": sdpa_us / us, "packed_tokens": packed,
            })  # fmt: skip
    return rows


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
    model_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict[str, Any]:
    """Everything `kvpack bench decode` measures, as the JSON-ready result: full-model decode of each cache (fp
    added first when missing) at each context (capped to fit the model), then the attention kernels of `backends`
    alone on `spec` (none when empty)."""
    from kvpack.attention import use_kvpack_attention
    from kvpack.attention.registry import prepare
    from kvpack.models import load_model

    specs = [parse_cache_name(name) for name in caches]
    if specs[0].name != "fp":
        specs.insert(0, parse_cache_name("fp"))
    for cache in specs:
        require_packages(cache)
    model, _ = load_model(model_name, dtype=dtype, device=device)
    use_kvpack_attention(model)  # fp and peer caches still go through SDPA; kvpack caches take the fused path
    for cache in specs:
        prepare(cache.backend)  # a kernel compiled on first use must not land in a timed prefill
    contexts = [min(c, context_limit(model.config) - steps - 3) for c in contexts]
    result: dict[str, Any] = {
        **provenance("decode", model, model_name),
        "contexts": contexts,
        "steps": steps,
        "bandwidth": read_bandwidth(),
        "rows": [],
    }
    entries = [(cache.name, model, cache) for cache in specs]
    speed = {}
    for context in contexts:
        print(f"Decode at {context} tokens: {len(specs)} caches, {steps} interleaved steps ...", file=sys.stderr)
        speed[context] = decode_speed(entries, context, steps, profile_steps=profile_steps)
    for cache in specs:
        row: dict[str, Any] = {"cache": cache.name}
        for context, by_cache in speed.items():
            measured, fp = by_cache[cache.name], by_cache["fp"]
            row[f"tokens_per_s@{context}"] = measured["tokens_per_s"]
            row[f"speed_vs_fp@{context}"] = measured["tokens_per_s"] / fp["tokens_per_s"]
            if "fp-prealloc" in by_cache:
                prealloc = by_cache["fp-prealloc"]["tokens_per_s"]
                row[f"speed_vs_fp_prealloc@{context}"] = measured["tokens_per_s"] / prealloc
            row[f"prefill_s@{context}"] = measured["prefill_s"]
            row[f"prefill_vs_fp@{context}"] = measured["prefill_s"] / fp["prefill_s"]
            row[f"cache_bytes@{context}"] = int(measured["cache_bytes"])
            if "profile_ms" in measured:
                row[f"profile_ms@{context}"] = measured["profile_ms"]
        result["rows"].append(row)
    if backends:
        print(f"Attention alone: {', '.join(backends)} and fp32 SDPA over {layers} layers ...", file=sys.stderr)
        result["attention"] = attention_speed(model.config, spec, contexts, list(backends), layers, calls)
        result["attention_spec"] = spec
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The decode result as a Markdown page."""
    contexts, bandwidth = result["contexts"], result["bandwidth"]
    header = ["cache"]
    for c in contexts:
        header += [f"tok/s @{c}", f"vs fp @{c}", f"vs fp-prealloc @{c}", f"prefill s @{c} (vs fp)"]
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
    lines = [
        f"# kvpack bench decode: {result['model']} ({result['dtype']})",
        "",
        *provenance_lines(result),
        f"- memory bandwidth measured in the same run: read {bandwidth['read_gb_s']:.1f} GB/s, copy (read + write) "
        f"{bandwidth['copy_gb_s']:.1f} GB/s",
        "",
        f"## Full-model decode ({result['steps']} single-token steps per cache and context, interleaved)",
        "",
        *markdown_table(header, rows),
        *_profile_markdown(result),
    ]
    if "attention" in result:
        header = ["context", "kernel", "µs per call", "bytes read", "GB/s", "% of read bandwidth", "vs fp32 SDPA"]
        rows = [
            [r["context"], r["kernel"], f"{r['us_per_call']:.0f}", f"{r['bytes_read']:,}", f"{r['gb_s']:.1f}",
             f"{100 * r['gb_s'] / bandwidth['read_gb_s']:.0f}%", f"{r['speed_vs_sdpa']:.2f}x"]
            for r in result["attention"]
        ]  # fmt: skip
        lines += [
            "",
            f"## Attention alone (one decode call, {result['attention_spec']}, rotating over layer caches)",
            "",
            *markdown_table(header, rows),
        ]
    return "\n".join(lines) + "\n"


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = result["contexts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in result["rows"]:
        left.plot(contexts, [row[f"tokens_per_s@{c}"] for c in contexts], marker="o", label=row["cache"])
    left.set_xlabel("context (tokens)")
    left.set_ylabel("decode tokens/s")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    kernels = list(dict.fromkeys(row["kernel"] for row in result.get("attention", [])))
    for kernel in kernels:
        points = [(r["context"], r["us_per_call"]) for r in result["attention"] if r["kernel"] == kernel]
        right.plot(*zip(*points, strict=True), marker="o", label=kernel)
    right.set_xlabel("context (tokens)")
    right.set_ylabel("µs per attention call")
    right.set_yscale("log")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: decode, {result['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
