"""`kvpack bench long`: one long greedy generation (16k+ tokens), checking that the cache grows by exactly the bytes
the layout says and that the process does not leak.

The model is a small random-weight Llama built in the run (seeded; default 4 layers, 4 KV heads of 64 dims, a 16k+
rotary range), because the real default model decodes ~10 tokens/s on CPU and a 16k-token run would take hours;
cache growth and leaks do not depend on the weights. Decoding is a plain loop of single-token forwards (what
`generate` does, without keeping every step's logits), sampled every `--sample-every` tokens:

  - packed bytes: the codes, scales and zeros of the tokens packed so far (each `PackedBuffer`'s valid part), which
    must equal the layout's formula for the packed length (`kvpack.cache.plan.packed_bytes`) at every sample, and
    the packed length must be every whole block beyond the residual window (no token packed early, none late);
  - held bytes: `cache.nbytes()`, the above plus the full-precision buffers and the packed buffers' unused capacity
    (which grows by max(256 tokens, 1/8 of the capacity) at a time, so it may run ahead of the valid bytes by that);
  - RSS: the process's resident memory, read after returning freed heap pages to the OS (`malloc_trim`; glibc
    otherwise keeps the packed buffers' old copies from each capacity growth). Its growth beyond the cache's held
    bytes, per token, is the in-run leak figure. The generation runs twice, each with a fresh cache; RSS after the
    second must come back to the first's (a cache that outlived its run would add its bytes).

JSON is the source of truth; Markdown is made from it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from kvpack.cache.plan import flushed_tokens, packed_bytes
from kvpack.compat import cache_kwargs
from kvpack.config import parse_spec
from kvpack.harness.caches import uniform_spec
from kvpack.harness.process import release_freed_memory, rss_bytes
from kvpack.harness.results import format_bytes, markdown_page, markdown_table, provenance


def tiny_llama(max_tokens: int, layers: int = 2, kv_heads: int = 2, head_dim: int = 64, seed: int = 0) -> Any:
    """A random-weight Llama with 2 query heads per KV head and a rotary range of `max_tokens`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = 2 * kv_heads
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        intermediate_size=2 * heads * head_dim,
        vocab_size=512,
        max_position_embeddings=max_tokens,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def packed_state(cache: Any) -> tuple[int, int]:
    """(valid packed bytes over all layers, packed tokens of the first layer)."""
    from kvpack.cache.layer import PackedLayer

    layers = [layer for layer in cache.layers if isinstance(layer, PackedLayer)]
    valid = sum(buf.view().nbytes for layer in layers for buf in (layer.packed_keys, layer.packed_values) if buf)
    return valid, layers[0].packed_length if layers else 0


def generate_long(model: Any, spec: str, backend: str, tokens: int, prompt: int, sample_every: int) -> dict[str, Any]:
    """Greedy decoding of `tokens` new tokens after a random prompt, with a sample every `sample_every` tokens."""
    from kvpack.cache.cache import KVPackCache

    config = parse_spec(spec)
    text = model.config
    rows = text.num_hidden_layers * text.num_key_value_heads  # batch 1
    ids = torch.randint(0, text.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    cache = KVPackCache(model, config, backend=backend)
    samples = []
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids, **cache_kwargs(model, cache)).logits[:, -1]
        for step in range(1, tokens + 1):
            next_token = logits.argmax(dim=-1, keepdim=True)
            logits = model(next_token, **cache_kwargs(model, cache)).logits[:, -1]
            if step % sample_every == 0 or step == tokens:
                valid, packed_len = packed_state(cache)
                seen = cache.get_seq_length()
                samples.append(
                    {
                        "new_tokens": step,
                        "cached_tokens": seen,
                        "packed_tokens": packed_len,
                        "expected_packed_tokens": flushed_tokens(max(seen - config.sinks, 0), config),
                        "packed_bytes": valid,
                        "formula_packed_bytes": rows
                        * (packed_bytes(config.key, packed_len, text.head_dim)
                           + packed_bytes(config.value, packed_len, text.head_dim)),
                        "held_bytes": cache.nbytes(),
                        "fp16_bytes": cache.fp16_nbytes(),
                        "rss_bytes": _live_rss_bytes(),
                        "elapsed_s": time.perf_counter() - start,
                    }
                )  # fmt: skip
    del cache, logits
    return {"samples": samples, "rss_after_bytes": _live_rss_bytes(), "seconds": time.perf_counter() - start}


def _live_rss_bytes() -> int | None:
    """RSS after returning freed heap pages to the OS: glibc keeps the packed buffers' previous, smaller copies
    (freed when their capacity grows) until trimmed, which would show as growth beyond the cache's bytes."""
    release_freed_memory(torch.device("cpu"))
    return rss_bytes()


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def summarize(run: dict[str, Any], bytes_per_token: float, warmup_tokens: int) -> dict[str, Any]:
    """Slopes (bytes per new token) of the packed, held and RSS bytes after the warm-up, and the checks."""
    samples = run["samples"]
    late = [s for s in samples if s["new_tokens"] >= warmup_tokens] or samples
    xs = [float(s["cached_tokens"]) for s in late]
    first, last = late[0], late[-1]
    tokens = last["cached_tokens"] - first["cached_tokens"]
    rss_growth = (last["rss_bytes"] - first["rss_bytes"]) if last["rss_bytes"] is not None else None
    held_growth = last["held_bytes"] - first["held_bytes"]
    return {
        "packed_bytes_equal_formula": all(s["packed_bytes"] == s["formula_packed_bytes"] for s in samples),
        "packed_tokens_as_expected": all(s["packed_tokens"] == s["expected_packed_tokens"] for s in samples),
        "formula_bytes_per_token": bytes_per_token,
        "packed_slope_bytes_per_token": _slope(xs, [float(s["packed_bytes"]) for s in late]),
        "held_slope_bytes_per_token": _slope(xs, [float(s["held_bytes"]) for s in late]),
        "rss_slope_bytes_per_token": _slope(xs, [float(s["rss_bytes"] or 0) for s in late]),
        "max_unused_capacity_bytes": max(s["held_bytes"] - s["packed_bytes"] for s in samples)
        - (samples[0]["held_bytes"] - samples[0]["packed_bytes"] if samples[0]["packed_bytes"] == 0 else 0),
        "rss_growth_bytes": rss_growth,
        "held_growth_bytes": held_growth,
        "rss_growth_beyond_cache_per_token": (rss_growth - held_growth) / tokens if rss_growth is not None else None,
        "tokens_per_s": samples[-1]["new_tokens"] / samples[-1]["elapsed_s"],
    }


def run_long(
    *,
    tokens: int = 16384,
    prompt: int = 64,
    spec: str = "k4v4",
    backend: str = "auto",
    runs: int = 2,
    sample_every: int = 256,
    warmup: int = 1024,
    layers: int = 4,
    kv_heads: int = 4,
    head_dim: int = 64,
) -> dict[str, Any]:
    """Everything `kvpack bench long` measures, as the JSON-ready result: `runs` generations of `tokens` tokens after
    a `prompt`-token prompt, each with a fresh `spec` cache, on a `tiny_llama` of that shape; slopes leave out the
    first `warmup` tokens."""
    from kvpack.attention.registry import prepare, use_kvpack_attention

    config = uniform_spec(spec)
    model = tiny_llama(prompt + tokens + 1, layers=layers, kv_heads=kv_heads, head_dim=head_dim)
    if backend != "dense":
        use_kvpack_attention(model)
    prepare(backend)
    block = config.block_tokens
    per_block = packed_bytes(config.key, block, head_dim) + packed_bytes(config.value, block, head_dim)
    bytes_per_token = layers * kv_heads * per_block / block
    result = provenance("long", model, f"random-weight Llama ({layers} layers)")
    shape = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": result["dtype"]}
    result.update(spec=config.spec, backend=backend, tokens=tokens, prompt_tokens=prompt, sample_every=sample_every)
    result.update(model_shape=shape, rss_before_bytes=rss_bytes(), runs=[])
    for index in range(runs):
        print(f"run {index + 1}/{runs}: {tokens} tokens with {config.spec} ({backend}) ...", file=sys.stderr)
        run = generate_long(model, config.spec, backend, tokens, prompt, sample_every)
        run["summary"] = summarize(run, bytes_per_token, min(warmup, tokens // 2))
        result["runs"].append(run)
    return result


def check(result: dict[str, Any]) -> list[str]:
    """What is wrong with a long run (empty when nothing is): the exact byte checks, and RSS after each run against
    the first: a cache that outlived its run (a leak) would add its held bytes to every later run; a quarter of them
    is allowed for the allocator's own noise."""
    problems = []
    runs = result["runs"]
    first_after = runs[0]["rss_after_bytes"]
    for i, run in enumerate(runs[1:], start=2):
        held = run["samples"][-1]["held_bytes"]
        if first_after is not None and run["rss_after_bytes"] - first_after > held / 4:
            problems.append(
                f"run {i}: RSS after the run is {format_bytes(run['rss_after_bytes'] - first_after)} above run 1's"
            )
    for i, run in enumerate(runs):
        summary = run["summary"]
        if not summary["packed_bytes_equal_formula"]:
            problems.append(f"run {i + 1}: packed bytes differ from the formula")
        if not summary["packed_tokens_as_expected"]:
            problems.append(f"run {i + 1}: tokens were packed early or late")
    return problems


def to_markdown(result: dict[str, Any]) -> str:
    """The long-run result as a Markdown page: one row per run, then samples of the first run, then the checks."""
    shape = result["model_shape"]
    header = ["run", "tok/s", "packed bytes = formula", "packed tokens as the rule says", "formula B/token",
              "packed slope", "held slope", "RSS slope", "RSS growth beyond the cache, B/token",
              "RSS after run"]  # fmt: skip
    rows = []
    for i, run in enumerate(result["runs"]):
        s = run["summary"]
        leak = s["rss_growth_beyond_cache_per_token"]
        rows.append(
            [i + 1, f"{s['tokens_per_s']:.0f}", "yes" if s["packed_bytes_equal_formula"] else "NO",
             "yes" if s["packed_tokens_as_expected"] else "NO", f"{s['formula_bytes_per_token']:.2f}",
             f"{s['packed_slope_bytes_per_token']:.2f}", f"{s['held_slope_bytes_per_token']:.2f}",
             f"{s['rss_slope_bytes_per_token']:.1f}", "" if leak is None else f"{leak:.1f}",
             format_bytes(run["rss_after_bytes"])]
        )  # fmt: skip
    samples = result["runs"][0]["samples"]
    every = max(1, len(samples) // 16)
    shown = samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else [])
    sample_rows = [
        [f"{s['new_tokens']:,}", f"{s['cached_tokens']:,}", f"{s['packed_tokens']:,}", f"{s['packed_bytes']:,}",
         f"{s['held_bytes']:,}", format_bytes(s["rss_bytes"])]
        for s in shown
    ]  # fmt: skip
    last, problems = result["runs"][-1]["samples"][-1], check(result)
    setup = [
        f"- model: {result['model']}, {shape['layers']} layers x {shape['kv_heads']} KV heads x {shape['head_dim']} "
        f"dims, {shape['dtype']}; greedy decoding after a {result['prompt_tokens']}-token prompt, batch 1",
        f"- sampled every {result['sample_every']} tokens; slopes are least squares over the samples after the warm-up",
    ]
    lines = [
        *markdown_table(header, rows),
        "",
        f"At {last['cached_tokens']:,} cached tokens: held {last['held_bytes']:,} bytes "
        f"({format_bytes(last['held_bytes'])}), of which packed {last['packed_bytes']:,}; a float16 DynamicCache "
        f"would hold {last['fp16_bytes']:,} ({last['fp16_bytes'] / last['held_bytes']:.2f}x). RSS before the first "
        f"run: {format_bytes(result['rss_before_bytes'])}.",
        "",
        "## Samples of the first run",
        "",
        *markdown_table(["new tokens", "cached", "packed tokens", "packed bytes", "held bytes", "RSS"], sample_rows),
        "",
        "Checks: " + ("all passed." if not problems else "; ".join(problems)),
    ]
    title = f"Long run: {result['tokens']:,} generated tokens, {result['spec']} ({result['backend']})"
    return markdown_page(title, result, setup, lines)
