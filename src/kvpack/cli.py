"""`kvpack <subcommand>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvpack.attention.registry import CACHE_BACKENDS
from kvpack.bench.compare import DEFAULT_CACHES
from kvpack.compat import cache_kwargs
from kvpack.config import DEFAULT_PRESET, PRESETS, CacheConfig, as_config, with_recommended_options
from kvpack.errors import KVPackError
from kvpack.weights import WEIGHT_CHOICES

DEFAULT_SPEC = DEFAULT_PRESET


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _ratio(reference: float, size: float) -> str:
    """`reference` vs `size` as people say it: "2.73x smaller", or "7.69x larger" when `size` is the larger."""
    return f"{reference / size:.2f}x smaller" if size <= reference else f"{size / reference:.2f}x larger"


def _read_prompt(args: argparse.Namespace) -> str:
    parts = []
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise KVPackError(f"--prompt-file {path} does not exist.")
        parts.append(path.read_text(encoding="utf-8").strip())
    if args.prompt:
        parts.append(args.prompt)
    if not parts:
        raise KVPackError("give a prompt (a positional argument) and/or --prompt-file.")
    return "\n\n".join(parts)


def _encode(tokenizer: Any, prompt: str, chat: bool) -> Any:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


@dataclass
class Generation:
    """New token ids of one `generate` call, with the prefill and decode times measured apart."""

    tokens: Any
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens.numel() / self.decode_s


def _generate(model: Any, inputs: Any, cache: Any, args: argparse.Namespace, cached: int = 0) -> Generation:
    """Generate after the prompt; `cached`: how many of the prompt's first tokens the cache already holds."""
    import torch

    sampling: dict[str, Any] = {"do_sample": False}
    if args.sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():  # not inference_mode: quanto's quantized weights fail on inference tensors
        # Prefill all but the last prompt token (after those the cache holds), so that generate's own time is the
        # decode alone.
        start = time.perf_counter()
        if ids.shape[1] - 1 > cached:
            model(
                input_ids=ids[:, cached:-1],
                attention_mask=mask[:, :-1],
                **cache_kwargs(model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
        prefilled = time.perf_counter()
        out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=args.max_new_tokens, **sampling)
        done = time.perf_counter()
    return Generation(tokens=out[0, ids.shape[1] :], prefill_s=prefilled - start, decode_s=done - prefilled)


def _common_prefix(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same


def _load_prefix(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, Any, float]:
    """The cache loaded from `--prefix-cache`, the prompt's inputs (the cached prefix, then the new text), and the
    seconds the load took. Raises KVPackError when the prompt does not continue the cached prefix."""
    import torch

    from kvpack.cache import KVPackCache

    print(f"Loading prefix cache {args.prefix_cache} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cache = KVPackCache.load(args.prefix_cache, model, tokenizer, backend=args.backend)
    load_s = time.perf_counter() - start
    prefix = cache.prefix_ids
    assert prefix is not None
    if prefix.shape[0] != 1:
        raise KVPackError(f"{args.prefix_cache} holds a batch of {prefix.shape[0]} prompts; generate continues one.")
    if args.cache is not None and as_config(args.cache) != cache.cache_config:
        raise KVPackError(
            f"--cache {args.cache} differs from the prefix cache's {cache.cache_config.spec}; omit --cache (the file's "
            "config is used) or rebuild the prefix cache with that spec."
        )
    chat = not args.no_chat
    head, tail = _chat_parts(tokenizer) if chat else ("", "")
    cached = prefix[0].tolist()
    if chat:
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        if cached[: len(head_ids)] != head_ids:
            raise KVPackError(
                f"{args.prefix_cache} was not built with the chat template (its tokens do not start with it); "
                "pass --no-chat."
            )
    if args.prompt_file is not None:
        ids = _encode(tokenizer, _read_prompt(args), chat)["input_ids"][0].tolist()
        same = _common_prefix(ids, cached)
        if same < len(cached):
            raise KVPackError(
                f"the prompt does not continue the cached prefix of {args.prefix_cache}: they differ at token {same} "
                f"of {len(cached)} (prompt: {tokenizer.decode(ids[same : same + 8])!r}, cache: "
                f"{tokenizer.decode(cached[same : same + 8])!r}). Give the same --prompt-file (and --no-chat) as the "
                "build, or omit --prompt-file to append the prompt after the cached prefix."
            )
    else:
        ids = cached + tokenizer("\n\n" + args.prompt + tail, add_special_tokens=False).input_ids
    if len(ids) == len(cached):
        raise KVPackError("the prompt adds nothing after the cached prefix; give a question (a positional argument).")
    input_ids = torch.tensor([ids], device=model.device)
    return cache, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, load_s


_CHAT_SPLIT = "\x00kvpack-text\x00"


def _chat_parts(tokenizer: Any) -> tuple[str, str]:
    """The chat template's text before and after a user message's content (`("", "")` without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    messages = [{"role": "user", "content": _CHAT_SPLIT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str) or text.count(_CHAT_SPLIT) != 1:
        raise KVPackError("this tokenizer's chat template changes the user's text; use --no-chat with a prefix cache.")
    head, tail = text.split(_CHAT_SPLIT)
    return head, tail


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text with a packed cache and summarise its size and speed."""
    import torch
    from transformers import DynamicCache

    from kvpack.attention import use_kvpack_attention
    from kvpack.attention.registry import prepare
    from kvpack.cache import KVPackCache
    from kvpack.models import load_model
    from kvpack.weights import weight_nbytes

    # Bad arguments fail before the model loads.
    config = as_config(args.cache or DEFAULT_SPEC)
    if args.prefix_cache is None:
        prompt = _read_prompt(args)
    elif not Path(args.prefix_cache).is_file():
        raise KVPackError(f"--prefix-cache {args.prefix_cache} does not exist; make one with `kvpack cache build`.")
    elif not args.prompt:
        raise KVPackError("give a prompt to append after the cached prefix (a positional argument).")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    if args.backend != "dense":
        use_kvpack_attention(model)  # the fp cache of --check still goes through SDPA
        prepare(args.backend)
    cached, load_s = 0, 0.0
    if args.prefix_cache is None:
        inputs = _encode(tokenizer, prompt, chat=not args.no_chat).to(model.device)
        # A profile's path, not its config: KVPackCache checks that it was made for this model.
        cache = KVPackCache(model.config, args.cache or DEFAULT_SPEC, backend=args.backend)
    else:
        cache, inputs, load_s = _load_prefix(args, model, tokenizer)
        config = cache.cache_config
        cached = cache.get_seq_length()
        built = f"; its prefill took {cache.prefill_s:.2f} s when built" if cache.prefill_s else ""
        print(f"Loaded a {cached:,}-token prefix in {load_s:.2f} s{built}", file=sys.stderr, flush=True)
    result = _generate(model, inputs, cache, args, cached)
    new_tokens = result.tokens
    print(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    print()
    n_new = int(new_tokens.numel())
    n_prompt = int(inputs["input_ids"].shape[1])
    packed, fp16 = cache.nbytes(), cache.fp16_nbytes()
    model_dtype_bytes = fp16 * torch.finfo(model.dtype).bits // 16
    prompt_time = f"{result.prefill_s:.1f} s"
    if cached:
        prompt_time = f"{cached:,} loaded from {Path(args.prefix_cache).name} in {load_s:.2f} s, the rest {prompt_time}"
    summary = (
        f"[{config.spec}] prompt {n_prompt} tokens ({prompt_time}), "
        f"{n_new} new tokens in {result.decode_s:.1f} s ({result.tokens_per_s:.1f} tokens/s); "
        f"cache {_human_bytes(packed)} for {cache.get_seq_length()} tokens: "
        f"{_ratio(fp16, packed)} than a float16 cache ({_human_bytes(fp16)})"
    )
    if model.dtype != torch.float16:
        summary += f", {_ratio(model_dtype_bytes, packed)} than this model's {str(model.dtype)[6:]} cache"
    if args.weights != "fp":
        weight_bytes = weight_nbytes(model)
        summary += f"; {args.weights} weights {_human_bytes(weight_bytes)}, total {_human_bytes(weight_bytes + packed)}"
    print(summary)
    if args.check:
        if cached:
            # The same config, prefilled afresh: the loaded cache must generate exactly the same tokens.
            fresh_cache = KVPackCache(model.config, config, backend=args.backend)
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=inputs["input_ids"][:, :cached], **cache_kwargs(model, fresh_cache), use_cache=True)
            fresh_s = time.perf_counter() - start
            fresh = _generate(model, inputs, fresh_cache, args, cached)
            same = _common_prefix(new_tokens.tolist(), fresh.tokens.tolist())
            verdict = "identical" if same == n_new == fresh.tokens.numel() else f"DIFFERENT after {same} tokens"
            print(
                f"[check] a fresh {config.spec} prefill of the {cached:,}-token prefix took {fresh_s:.2f} s "
                f"({fresh_s / load_s:.0f}x the load) and generates {verdict} tokens ({same}/{n_new})"
            )
        ref = _generate(model, inputs, DynamicCache(config=model.config), args)
        reference = ref.tokens
        same = _common_prefix(new_tokens.tolist(), reference.tolist())
        if same == n_new == reference.numel():
            verdict = f"identical to the full-precision cache's output ({same}/{n_new} tokens)"
        else:
            verdict = (
                f"same as the full-precision cache's output for the first {same} of {reference.numel()} tokens; "
                f"it continues: {tokenizer.decode(reference[same:], skip_special_tokens=True).strip()[:200]!r}"
            )
        print(f"[check] {verdict}; full-precision cache: {ref.tokens_per_s:.1f} tokens/s")
    return 0


def cmd_cache_build(args: argparse.Namespace) -> int:
    """Prefill a prompt (a document, a system prompt) into a packed cache and save it."""
    import torch

    from kvpack.cache.persist import prefix_cache, read_cache_file
    from kvpack.models import DEFAULT_MODEL, load_model

    config = as_config(args.cache)
    text = _read_prompt(args)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise KVPackError(f"-o {output}: the directory {output.parent} does not exist.")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    head = _chat_parts(tokenizer)[0] if not args.no_chat else ""
    # As generate encodes: a chat-rendered text has its special tokens spelled out, a raw one gets the tokenizer's.
    ids = tokenizer(head + text, add_special_tokens=False).input_ids if head else tokenizer(text).input_ids
    print(f"Prefilling {len(ids):,} tokens with a {config.spec} cache ...", file=sys.stderr, flush=True)
    cache = prefix_cache(model, [ids], config)
    assert cache.prefill_s is not None
    print(f"Prefilled in {cache.prefill_s:.2f} s; saving ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cache.save(output, model, tokenizer=tokenizer, name=args.model or DEFAULT_MODEL)
    save_s = time.perf_counter() - start
    size = output.stat().st_size
    fp16 = read_cache_file(output).header.fp16_nbytes()
    print(
        f"wrote {output}: {len(ids):,} tokens, {config.spec}, {_human_bytes(size)} ({_ratio(fp16, size)} than "
        f"the float16 cache, {_human_bytes(fp16)}); prefill {cache.prefill_s:.2f} s, save {save_s:.2f} s"
    )
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    """Print a prompt-cache file's header (checking its format, schema and checksum)."""
    from kvpack.cache.persist import read_cache_file

    file = read_cache_file(args.file)
    header = file.header
    if args.json:
        print(json.dumps({"path": str(file.path), "nbytes": file.nbytes, **header.to_dict()}, indent=2))
        return 0
    fp = header.model
    kinds = {kind.split(":")[0]: 0 for kind in fp.layer_plan}
    for kind in fp.layer_plan:
        kinds[kind.split(":")[0]] += 1
    fp16 = header.fp16_nbytes()
    lines = [
        f"{file.path}: kvpack prompt cache, schema {header.schema_version}, written by kvpack {header.kvpack_version} "
        f"on {header.created}; checksum ok",
        f"  cache:   {header.cache_config.spec}, {header.tokens:,} tokens"
        + (f" x batch {header.batch}" if header.batch > 1 else ""),
        f"  size:    {_human_bytes(file.nbytes)} on disk; a float16 cache of these tokens: {_human_bytes(fp16)} "
        f"({fp16 / file.nbytes:.2f}x)",
        f"  model:   {fp.name}: {fp.architecture}, {fp.dtype}, {len(fp.layer_plan)} layers "
        f"({', '.join(f'{n} {k}' for k, n in kinds.items())}) x {fp.kv_heads} kv heads x head dim {fp.head_dim}",
        f"           config {fp.config_sha256[:16]}, weights {fp.weights_sha256[:16]}, tokenizer "
        f"{(fp.tokenizer_sha256 or 'not saved')[:16]}",
    ]
    if header.prefill_s is not None:
        lines.append(f"  prefill: {header.prefill_s:.2f} s when built")
    print("\n".join(lines))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Which attention backend this machine gets, and why."""
    from kvpack.attention.registry import describe

    print("\n".join(describe()))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    """Explain a cache spec string."""
    config: CacheConfig = as_config(args.spec)
    if args.spec.strip().lower() in PRESETS:
        print(f"preset {args.spec.strip().lower()}: {PRESETS[args.spec.strip().lower()]}")
    print(f"spec: {config.spec}")
    for name, spec in (("keys", config.key), ("values", config.value)):
        print(
            f"  {name}: {spec.bits}-bit codes, per {spec.axis} in groups of {spec.group_size}, "
            f"{spec.bits_per_value:g} bits per value with float16 scale and zero"
            + (f" and {spec.outliers} exact outlier(s) per group" if spec.outliers else "")
        )
        extras = [
            "rotated (randomized Hadamard) before quantization" if spec.rotation != "none" else "",
            f"non-uniform levels (codebook {spec.codebook})" if spec.codebook != "uniform" else "",
            "range clipped to the group's least squared error" if spec.clip else "",
        ]
        if any(extras):
            print(f"    {'; '.join(e for e in extras if e)}")
    if config.layer_bits:
        per_layer = ", ".join(f"{i}: k{k}v{v}" for i, (k, v) in enumerate(config.layer_bits))
        print(f"  per-layer bits (replace the bits above): {per_layer}")
    print(f"  residual: newest {config.residual} tokens in full precision; sinks: first {config.sinks} tokens")
    print(f"  average: {config.bits_per_value:.4g} bits per value (metadata included; sinks and residual excluded)")
    plain = replace(CacheConfig(), key=replace(CacheConfig().key, bits=config.key.bits))
    plain = replace(plain, value=replace(plain.value, bits=config.value.bits))
    recommended = with_recommended_options(plain)
    if recommended != plain:
        added = recommended.spec.split("-")[3:]  # after k<b>v<b>-g<n>-r<n>
        print(
            f"  a spec k{config.key.bits}v{config.value.bits} starts from -{'-'.join(added)} (measured best for these "
            "bits on the calibration text); write -plain to start from plain KIVI"
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure per-layer sensitivity on the calibration text, allocate bits within a budget, write a profile."""
    import torch

    from kvpack.calibrate import calibrate, load_profile, reallocate, summary_table
    from kvpack.models import DEFAULT_MODEL, load_model

    output = Path(args.out)
    if not output.parent.is_dir():
        raise KVPackError(f"the folder of --out {output} does not exist.")
    if args.from_profile:  # another budget for measurements already made: no model run
        profile = reallocate(load_profile(args.from_profile), args.budget_bits)
        profile.save(output)
        print(summary_table(profile))
        print(f"wrote {output} (measurements of {args.from_profile}): use it with --cache {output}")
        return 0
    base = as_config(args.base)  # bad arguments fail before the model loads
    if base.layer_bits:
        raise KVPackError(f"--base {args.base} already has per-layer bits; give a uniform spec (only bits vary).")
    try:
        candidates = tuple(int(b) for b in args.bits.split(","))
    except ValueError as exc:
        raise KVPackError(f"--bits {args.bits!r}: give comma-separated bit widths, e.g. 2,3,4,8.") from exc
    if args.tokens < 2:
        raise KVPackError(f"--tokens {args.tokens}: calibration needs at least 2 tokens.")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    profile = calibrate(
        model,
        tokenizer,
        args.budget_bits,
        base=base,
        candidates=candidates,
        tokens=args.tokens,
        data=args.data,
        model_name=args.model or DEFAULT_MODEL,
    )
    profile.save(output)
    print(summary_table(profile))
    print(f"wrote {output}: use it with --cache {output}")
    return 0


def _add_measure_options(parser: argparse.ArgumentParser, tokens: int) -> None:
    from kvpack.eval.perplexity import default_data_path

    parser.add_argument("--tokens", type=int, default=tokens, help=f"tokens of the text to stream (default {tokens})")
    parser.add_argument("--data", default=str(default_data_path()), help="text file (default: WikiText-2 test)")
    parser.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--weights",
        default="fp",
        help="weight formats, comma-separated among fp,int8,int4 (optimum-quanto); every cache runs with each, "
        "and fp weights with the fp cache stay the reference (default fp)",
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison, write JSON (+ Markdown and PNG), print the table."""
    from kvpack.bench.compare import run_compare
    from kvpack.bench.report import markdown, write_report

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict[str, Any]) -> None:
        out.write_text(json.dumps(partial, indent=2) + "\n")

    result = run_compare(args, checkpoint=save)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["contexts"]:
        md_path, png_path = write_report(out)
        print(f"wrote {out}, {md_path}, {png_path}", file=sys.stderr)
    print(markdown(result))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """Streamed perplexity of one cache, with KL and top-1 agreement vs the full-precision cache."""
    from kvpack.bench.compare import run_compare
    from kvpack.bench.report import markdown

    args.caches, args.contexts, args.steps = args.cache, "", 0
    result = run_compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown and PNG from a compare JSON."""
    from kvpack.bench.report import write_report

    md_path, png_path = write_report(Path(args.json))
    print(f"wrote {md_path} and {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpack",
        description="Quantized, packed key/value caches for transformer language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text with a packed cache; print size and speed",
        description="Generate text with a packed KV cache and print a one-line summary: new tokens, tokens/s, "
        "cache bytes and the ratio vs a float16 cache of the same tokens.",
    )
    gen.add_argument("prompt", nargs="?", default="", help="the prompt (appended after --prompt-file, if given)")
    gen.add_argument("--prompt-file", help="a text file to put before the prompt (e.g. a document to ask about)")
    gen.add_argument(
        "--cache",
        default=None,
        help=f"cache: a preset ({', '.join(PRESETS)}), a spec (k4v4, k2v2, k4v4-plain, ...) or a profile .json "
        f"(default {DEFAULT_SPEC}, or the prefix cache's)",
    )
    gen.add_argument(
        "--prefix-cache",
        metavar="FILE",
        help="start from a prompt cache saved by `kvpack cache build`: the prompt is appended after its prefix (or, "
        "with --prompt-file, must start with it)",
    )
    gen.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2-135M)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    gen.add_argument(
        "--backend",
        choices=CACHE_BACKENDS,
        default="auto",
        help="attention on the packed cache: auto (the fastest available), cpu (C++ kernel), numba, torch, or dense "
        "(dequantize, then the model's own attention) (default auto)",
    )
    gen.add_argument(
        "--weights", choices=WEIGHT_CHOICES, default="fp", help="quantize the linear weights (optimum-quanto)"
    )
    gen.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    gen.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--check", action="store_true", help="also generate with a full-precision cache and compare")
    gen.set_defaults(func=cmd_generate)

    cache = sub.add_parser(
        "cache",
        help="prompt caches on disk: build one from a document, show one",
        description="Prompt caches: the packed cache of a reusable prefix (a document, a system prompt), saved to "
        "disk and loaded by `kvpack generate --prefix-cache FILE` instead of recomputing the prefill.",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="<cache command>", required=True)
    build = cache_sub.add_parser(
        "build",
        help="prefill a document into a packed cache and save it",
        description="Prefill the text (--prompt-file and/or a positional text) with a packed cache and save it with "
        "its token ids and the model's fingerprint. With the chat template (the default), the cached prefix is the "
        "template's start and the text; `generate --prefix-cache` appends the question after it.",
    )
    build.add_argument("prompt", nargs="?", default="", help="text to cache (appended after --prompt-file, if given)")
    build.add_argument("--prompt-file", help="a text file to cache (e.g. a document to ask about)")
    build.add_argument("-o", "--output", required=True, help="the file to write (e.g. doc.kvpc)")
    build.add_argument("--cache", default=DEFAULT_SPEC, help=f"preset, spec or profile (default {DEFAULT_SPEC})")
    build.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2-135M)")
    build.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    build.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    build.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    build.add_argument("--no-chat", action="store_true", help="cache the raw text, without the chat template")
    build.set_defaults(func=cmd_cache_build)
    info = cache_sub.add_parser(
        "info", help="show a prompt cache's header", description="Check a prompt-cache file and print its header."
    )
    info.add_argument("file", help="a file written by `kvpack cache build` or KVPackCache.save")
    info.add_argument("--json", action="store_true", help="print the whole header as JSON (token ids included)")
    info.set_defaults(func=cmd_cache_info)

    compare = sub.add_parser(
        "compare",
        help="quality, memory and speed of several caches, side by side",
        description="Stream a text through the model with each cache (PPL, ΔPPL, KL and top-1 vs the "
        "full-precision cache), then measure cache bytes and decode tokens/s at each context, interleaved. "
        "Writes JSON, Markdown and PNG.",
    )
    compare.add_argument("--caches", default=DEFAULT_CACHES, help=f"comma-separated (default {DEFAULT_CACHES})")
    _add_measure_options(compare, tokens=2048)
    compare.add_argument("--contexts", default="1024,4096", help="decode-speed contexts (default 1024,4096)")
    compare.add_argument("--steps", type=int, default=16, help="timed decode steps per cache and context")
    compare.add_argument("--out", default="benchmarks/results/compare.json", help="JSON path (.md/.png beside it)")
    compare.set_defaults(func=cmd_compare)

    ppl = sub.add_parser("ppl", help="streamed perplexity of a cache, with KL and top-1 vs fp")
    ppl.add_argument(
        "--cache",
        default=DEFAULT_SPEC,
        help=f"cache: kvpack preset or spec, fp, or a peer like quanto-int4 (default {DEFAULT_SPEC})",
    )
    _add_measure_options(ppl, tokens=2048)
    ppl.add_argument("--json", default=None, help="also write the result as JSON")
    ppl.set_defaults(func=cmd_ppl)

    cal = sub.add_parser(
        "calibrate",
        help="per-layer bits within a budget, from measured sensitivity; writes a profile",
        description="Measure, on the calibration text, how much each layer's keys and values at each bit width "
        "change the next-token distributions (mean KL vs the exact model, one tensor quantized at a time, as the "
        "cache would store it), choose the per-layer bits that minimise the summed KL within the budget (exact "
        "dynamic program), and write a JSON profile that --cache accepts in place of a spec.",
    )
    cal.add_argument("--budget-bits", type=float, required=True, help="average bits per value, metadata included")
    cal.add_argument(
        "--base",
        default=DEFAULT_PRESET,
        help="spec whose options are kept, only bits vary (default: the balanced preset)",
    )
    cal.add_argument("--bits", default="2,3,4,8", help="candidate bit widths (default 2,3,4,8)")
    cal.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    cal.add_argument("--data", default=None, help="a UTF-8 text file (default: kvpack's calibration text)")
    cal.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2)")
    cal.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    cal.add_argument("-o", "--out", required=True, help="the profile to write (e.g. profile.json)")
    cal.add_argument(
        "--from",
        dest="from_profile",
        default=None,
        help="re-allocate the measurements of this profile within --budget-bits (no model run; its model, base, "
        "bits and text are kept, the other options are ignored)",
    )
    cal.set_defaults(func=cmd_calibrate)

    report = sub.add_parser("report", help="Markdown tables and PNG plots from a compare JSON")
    report.add_argument("json", help="a JSON written by `kvpack compare`")
    report.set_defaults(func=cmd_report)

    from kvpack.bench import decode, long_run, memory, persist, threads
    from kvpack.eval import passkey

    memory.add_parser(sub)
    passkey.add_parser(sub)
    bench = decode.add_parser(sub)
    persist.add_parser(bench)
    long_run.add_parser(bench)
    threads.add_parser(bench)

    doctor = sub.add_parser("doctor", help="which attention backend this machine gets, and why")
    doctor.set_defaults(func=cmd_doctor)

    spec = sub.add_parser("spec", help="explain a cache spec string (bits, groups, residual, sinks)")
    spec.add_argument("spec", help="e.g. k4v2-g32-r64-s4")
    spec.set_defaults(func=cmd_spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVPackError as exc:
        print(f"kvpack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
