"""`kvpack <subcommand>`: the command-line entry point.

`COMMANDS` is the whole command line, one row per subcommand (`cache build` and `bench decode` name a group, then
its command): the help, the function that declares its options and the handler. Handlers convert the parsed options
once and call the library, whose functions take typed arguments; `main` applies `--threads` before any handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from kvpack.attention.registry import CACHE_BACKENDS
from kvpack.bench import compare, decode, long_run, memory, persist, report, threads
from kvpack.bench.synthetic import MODEL_SHAPES
from kvpack.cache.auto import auto_budget, auto_profile
from kvpack.calibrate import DEFAULT_METHOD, METHODS
from kvpack.chat import chat_parts
from kvpack.compat import cache_kwargs
from kvpack.config import DEFAULT_PRESET, PRESETS
from kvpack.errors import KVPackError
from kvpack.eval import passkey, ruler
from kvpack.harness.results import (
    add_model_options,
    command_line,
    format_bytes,
    markdown_table,
    parse_float_list,
    parse_int_list,
    parse_list,
    provenance,
    publish,
    write_json,
)
from kvpack.profile import Profile, resolve_config
from kvpack.texts import default_data_path
from kvpack.weights import WEIGHT_CHOICES


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
        turns = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def _generate(model: Any, inputs: Any, cache: Any, args: argparse.Namespace) -> tuple[list[int], float, float]:
    """The new token ids after the prompt, and the seconds of the prefill and of the decode, measured apart. `cache`
    may already hold the prompt's first tokens."""
    import torch

    sampling: dict[str, Any] = {"do_sample": False}
    if args.sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    ids, mask, cached = inputs["input_ids"], inputs["attention_mask"], cache.get_seq_length()
    cache_args = cache_kwargs(model, cache)
    with torch.no_grad():  # not inference_mode: quanto's quantized weights fail on inference tensors
        # Prefill all but the last prompt token (after those the cache holds), so that generate's own time is the
        # decode alone.
        start = time.perf_counter()
        if ids.shape[1] - 1 > cached:
            model(
                input_ids=ids[:, cached:-1], attention_mask=mask[:, :-1], **cache_args, use_cache=True, logits_to_keep=1
            )
        prefilled = time.perf_counter()
        out = model.generate(**inputs, **cache_args, max_new_tokens=args.max_new_tokens, **sampling)
    return out[0, ids.shape[1] :].tolist(), prefilled - start, time.perf_counter() - prefilled


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _check_cache(text: str) -> None:
    """Raise ConfigError for a --cache that is no preset, spec, profile or `auto-<bits>` (before a model loads)."""
    if auto_budget(text) is None:
        resolve_config(text)


def _cache_config(text: str, model: Any, tokenizer: Any) -> Any:
    """The cache config a --cache names for `model` (an `auto-<bits>` spec: its stored profile, or calibrated now)."""
    budget = auto_budget(text)
    return auto_profile(model, budget, tokenizer).config if budget is not None else resolve_config(text, model.config)


def _load_prefix(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, Any, float]:
    """The cache loaded from `--prefix-cache`, the prompt's inputs (the cached prefix, then the new text), and the
    seconds the load took (also said on stderr). Raises KVPackError when the prompt does not continue the prefix."""
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
    if args.cache is not None and _cache_config(args.cache, model, tokenizer) != cache.cache_config:
        raise KVPackError(
            f"--cache {args.cache} differs from the prefix cache's {cache.cache_config.spec}; omit --cache (the file's "
            "config is used) or rebuild the prefix cache with that spec."
        )
    head, tail = ("", "") if args.no_chat else chat_parts(tokenizer)
    cached = prefix[0].tolist()
    head_ids = tokenizer(head, add_special_tokens=False).input_ids  # none without the chat template
    if cached[: len(head_ids)] != head_ids:
        raise KVPackError(
            f"{args.prefix_cache} was not built with the chat template (its tokens do not start with it); "
            "pass --no-chat."
        )
    if args.prompt_file is not None:
        ids = _encode(tokenizer, _read_prompt(args), not args.no_chat)["input_ids"][0].tolist()
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
    built = f"; its prefill took {cache.prefill_s:.2f} s when built" if cache.prefill_s else ""
    print(f"Loaded a {len(cached):,}-token prefix in {load_s:.2f} s{built}", file=sys.stderr, flush=True)
    input_ids = torch.tensor([ids], device=model.device)
    return cache, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, load_s


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text with a packed KV cache and print a one-line summary: new tokens, tokens/s, cache bytes and the
    ratio vs a float16 cache of the same tokens."""
    import torch
    from transformers import DynamicCache

    from kvpack.cache import KVPackCache
    from kvpack.cache.persist import prefix_cache
    from kvpack.harness.caches import load_timed_model
    from kvpack.models import load_model
    from kvpack.weights import weight_nbytes

    _check_cache(args.cache or DEFAULT_PRESET)  # bad arguments fail before the model loads
    if args.prefix_cache is None:
        prompt = _read_prompt(args)
    elif not Path(args.prefix_cache).is_file():
        raise KVPackError(f"--prefix-cache {args.prefix_cache} does not exist; make one with `kvpack cache build`.")
    elif not args.prompt:
        raise KVPackError("give a prompt to append after the cached prefix (a positional argument).")
    loader = load_model if args.backend == "dense" else partial(load_timed_model, backends=[args.backend])
    # Through kvpack's attention unless dense; the fp cache of --check still goes through SDPA.
    model, tokenizer = loader(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    load_s = 0.0
    if args.prefix_cache is None:
        inputs = _encode(tokenizer, prompt, chat=not args.no_chat).to(model.device)
        # A profile's path, not its config: KVPackCache checks that it was made for this model; the model itself, as
        # an auto-<bits> spec calibrates it.
        cache = KVPackCache(model, args.cache or DEFAULT_PRESET, backend=args.backend, tokenizer=tokenizer)
    else:
        cache, inputs, load_s = _load_prefix(args, model, tokenizer)
    config, cached = cache.cache_config, cache.get_seq_length()
    tokens, prefill_s, decode_s = _generate(model, inputs, cache, args)
    print(tokenizer.decode(tokens, skip_special_tokens=True).strip() + "\n")
    packed, fp16 = cache.nbytes(), cache.fp16_nbytes()
    prompt_time = f"{prefill_s:.1f} s"
    if cached:
        prompt_time = f"{cached:,} loaded from {Path(args.prefix_cache).name} in {load_s:.2f} s, the rest {prompt_time}"
    summary = (
        f"[{config.spec}] prompt {inputs['input_ids'].shape[1]} tokens ({prompt_time}), "
        f"{len(tokens)} new tokens in {decode_s:.1f} s ({len(tokens) / decode_s:.1f} tokens/s); "
        f"cache {format_bytes(packed)} for {cache.get_seq_length()} tokens: "
        f"{_ratio(fp16, packed)} than a float16 cache ({format_bytes(fp16)})"
    )
    if model.dtype != torch.float16:
        model_dtype_bytes = fp16 * torch.finfo(model.dtype).bits // 16
        summary += f", {_ratio(model_dtype_bytes, packed)} than this model's {str(model.dtype)[6:]} cache"
    if args.weights != "fp":
        weight_bytes = weight_nbytes(model)
        summary += f"; {args.weights} weights {format_bytes(weight_bytes)}, total {format_bytes(weight_bytes + packed)}"
    print(summary)
    if args.check and cached:
        # The same config, prefilled afresh: the loaded cache must generate exactly the same tokens.
        fresh = prefix_cache(model, inputs["input_ids"][:, :cached], config, backend=args.backend)
        assert fresh.prefill_s is not None
        fresh_tokens = _generate(model, inputs, fresh, args)[0]
        same = _common_prefix(tokens, fresh_tokens)
        verdict = "identical" if tokens == fresh_tokens else f"DIFFERENT after {same} tokens"
        print(
            f"[check] a fresh {config.spec} prefill of the {cached:,}-token prefix took {fresh.prefill_s:.2f} s "
            f"({fresh.prefill_s / load_s:.0f}x the load) and generates {verdict} tokens ({same}/{len(tokens)})"
        )
    if args.check:
        reference, _, reference_s = _generate(model, inputs, DynamicCache(config=model.config), args)
        same = _common_prefix(tokens, reference)
        if tokens == reference:
            verdict = f"identical to the full-precision cache's output ({same}/{len(tokens)} tokens)"
        else:
            verdict = (
                f"same as the full-precision cache's output for the first {same} of {len(reference)} tokens; "
                f"it continues: {tokenizer.decode(reference[same:], skip_special_tokens=True).strip()[:200]!r}"
            )
        print(f"[check] {verdict}; full-precision cache: {len(reference) / reference_s:.1f} tokens/s")
    return 0


def _user_turns(interactive: bool) -> Iterator[str]:
    """The user's turns: the lines of stdin, blank ones skipped; at a terminal, each asked for with `> `."""
    if not interactive:
        yield from (line.strip() for line in sys.stdin if line.strip())
        return
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip():
            yield line.strip()


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with one packed cache kept across turns: each line of stdin is a user turn (asked for with `> ` at a
    terminal), each reply goes to stdout and a line per turn to stderr: the cache's bytes, the prompt tokens
    prefilled (only what the turn added) and the time. --prefix-cache starts from a saved document (`kvpack cache
    build`: it starts the first user message) or conversation (--save), whose tokens are reused, not prefilled."""
    from kvpack.cache import KVPackCache
    from kvpack.chat import Conversation
    from kvpack.harness.caches import load_timed_model
    from kvpack.models import load_model

    _check_cache(args.cache or DEFAULT_PRESET)  # bad arguments fail before the model loads
    if args.prefix_cache is not None:
        if not Path(args.prefix_cache).is_file():
            raise KVPackError(f"--prefix-cache {args.prefix_cache} does not exist; make one with `kvpack cache build`.")
        if args.system is not None:
            raise KVPackError("--system: a prefix cache already holds the start of the conversation.")
    if args.save is not None and not Path(args.save).parent.is_dir():
        raise KVPackError(f"--save {args.save}: the directory {Path(args.save).parent} does not exist.")
    loader = load_model if args.backend == "dense" else partial(load_timed_model, backends=[args.backend])
    model, tokenizer = loader(args.model, dtype=args.dtype, device=args.device)
    if args.prefix_cache is None:
        chat = Conversation(model, tokenizer, args.cache or DEFAULT_PRESET, system=args.system, backend=args.backend)
    else:
        start = time.perf_counter()
        chat = Conversation.load(args.prefix_cache, model, tokenizer, backend=args.backend)
        assert isinstance(chat.cache, KVPackCache)
        if args.cache is not None and _cache_config(args.cache, model, tokenizer) != chat.cache.cache_config:
            raise KVPackError(
                f"--cache {args.cache} differs from the prefix cache's {chat.cache.cache_config.spec}; omit --cache "
                "(the file's config is used)."
            )
        what = f"a conversation of {len(chat.messages)} messages" if chat.context is None else "a document"
        print(
            f"Loaded {what} ({len(chat.cached_ids):,} tokens) from {args.prefix_cache} in "
            f"{time.perf_counter() - start:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    interactive = sys.stdin.isatty()
    try:
        for text in _user_turns(interactive):
            reply = chat.say(text, max_new_tokens=args.max_new_tokens)
            print(reply.strip() + ("\n" if interactive else ""), flush=True)
            turn = chat.turns[-1]
            print(
                f"[turn {len(chat.turns)}] cache {format_bytes(turn.cache_nbytes or 0)} for {turn.cache_tokens:,} "
                f"tokens; prompt {turn.new_tokens:,} new tokens ({turn.reused_tokens:,} reused); "
                f"{turn.generated_tokens} tokens in {turn.seconds:.2f} s ({turn.tokens_per_s:.1f} tokens/s)",
                file=sys.stderr,
                flush=True,
            )
    except KeyboardInterrupt:
        print(file=sys.stderr)
    if args.save is not None:
        chat.save(args.save)
        print(f"wrote {args.save} ({len(chat.cached_ids):,} tokens, {len(chat.messages)} messages)", file=sys.stderr)
    return 0


def cmd_cache_build(args: argparse.Namespace) -> int:
    """Prefill the text (--prompt-file and/or a positional text) with a packed cache and save it with its token ids
    and the model's fingerprint. With the chat template (the default), the cached prefix is the template's start and
    the text; `generate --prefix-cache` appends the question after it."""
    from kvpack.cache.persist import prefix_cache, read_cache_file
    from kvpack.models import DEFAULT_MODEL, load_model

    _check_cache(args.cache)  # bad arguments fail before the model loads
    text = _read_prompt(args)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise KVPackError(f"-o {output}: the directory {output.parent} does not exist.")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    config = _cache_config(args.cache, model, tokenizer)
    head = chat_parts(tokenizer)[0] if not args.no_chat else ""
    # As generate encodes: a chat-rendered text has its special tokens spelled out, a raw one gets the tokenizer's.
    ids = tokenizer(head + text, add_special_tokens=False).input_ids if head else tokenizer(text).input_ids
    print(f"Prefilling {len(ids):,} tokens with a {config.spec} cache ...", file=sys.stderr, flush=True)
    cache = prefix_cache(model, [ids], config)
    print(f"Prefilled in {cache.prefill_s:.2f} s; saving ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cache.save(output, model, tokenizer=tokenizer, name=args.model or DEFAULT_MODEL)
    save_s = time.perf_counter() - start
    size, fp16 = output.stat().st_size, read_cache_file(output).header.fp16_nbytes()
    print(
        f"wrote {output}: {len(ids):,} tokens, {config.spec}, {format_bytes(size)} ({_ratio(fp16, size)} than "
        f"the float16 cache, {format_bytes(fp16)}); prefill {cache.prefill_s:.2f} s, save {save_s:.2f} s"
    )
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    """Check a prompt-cache file (format, schema, checksum) and print its header."""
    from kvpack.cache.persist import read_cache_file

    file = read_cache_file(args.file)
    header = file.header
    if args.json:
        print(json.dumps({"path": str(file.path), "nbytes": file.nbytes, **header.to_dict()}, indent=2))
        return 0
    fp, fp16 = header.model, header.fp16_nbytes()
    kinds = Counter(kind.split(":")[0] for kind in fp.layer_plan)
    batch = f" x batch {header.batch}" if header.batch > 1 else ""
    prefill = "" if header.prefill_s is None else f"\n  prefill: {header.prefill_s:.2f} s when built"
    print(
        f"{file.path}: kvpack prompt cache, schema {header.schema_version}, written by kvpack {header.kvpack_version} "
        f"on {header.created}; checksum ok\n"
        f"  cache:   {header.cache_config.spec}, {header.tokens:,} tokens{batch}\n"
        f"  size:    {format_bytes(file.nbytes)} on disk; a float16 cache of these tokens: {format_bytes(fp16)} "
        f"({fp16 / file.nbytes:.2f}x)\n"
        f"  model:   {fp.name}: {fp.architecture}, {fp.dtype}, {len(fp.layer_plan)} layers "
        f"({', '.join(f'{n} {k}' for k, n in kinds.items())}) x {fp.kv_heads} kv heads x head dim {fp.head_dim}\n"
        f"           config {fp.config_sha256[:16]}, weights {fp.weights_sha256[:16]}, tokenizer "
        f"{(fp.tokenizer_sha256 or 'not saved')[:16]}{prefill}"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Which attention backend this machine gets, and why."""
    from kvpack.attention.registry import describe

    print("\n".join(describe()))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    """Explain a cache spec string."""
    config, preset = resolve_config(args.spec), args.spec.strip().lower()
    if preset in PRESETS:
        print(f"preset {preset}: {PRESETS[preset]}")
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
    bits = f"k{config.key.bits}v{config.value.bits}"
    recommended = resolve_config(bits)
    if recommended != resolve_config(bits + "-plain"):
        added = recommended.spec.split("-")[3:]  # after k<b>v<b>-g<n>-r<n>
        print(
            f"  a spec {bits} starts from -{'-'.join(added)} (measured best for these bits on the calibration text); "
            "write -plain to start from plain KIVI"
        )
    return 0


def profile_table(profile: Profile) -> str:
    """The per-layer choice and KLs as a Markdown table, then the totals."""
    header = ["layer", "K bits", "V bits", *(f"{t} KL@{b}" for t in "KV" for b in profile.candidates)]
    rows = [
        [i, k, v, *(f"{x:.2e}" for x in (*profile.key_kl[i], *profile.value_kl[i]))]
        for i, (k, v) in enumerate(profile.config.layer_bits)
    ]
    lines = markdown_table(header, rows)
    lines.append(
        f"\nbudget {profile.budget_bits:g} bits/value, achieved {profile.average_bits:.4g} (metadata included); "
        f"summed KL {profile.predicted_kl:.4g} (additive model); base {profile.base}; "
        f"{profile.tokens} tokens of {profile.data_name}; {profile.seconds:.0f} s"
    )
    if profile.choices:  # options chosen too (--base auto): every candidate measured whole, the lowest KL chosen
        lines.append("\nmeasured whole on the calibration text (lowest KL chosen):\n")
        ranked = sorted(profile.choices, key=lambda c: c["kl"])
        lines += markdown_table(
            ["options", "bits", "bits/value", "KL"],
            [[c["base"].replace("k4v4", "k*v*", 1), c["kind"] if c["kind"] != "uniform" else c["spec"].split("-")[0],
              f"{c['average_bits']:.3f}", f"{c['kl']:.3g}"] for c in ranked],
        )  # fmt: skip
    return "\n".join(lines)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure, on the calibration text, how much each layer's keys and values at each bit width change the
    next-token distributions (mean KL vs the exact model, one tensor quantized at a time, as the cache would store
    it), choose the per-layer bits that minimise the summed KL within the budget (exact dynamic program), and write a
    JSON profile that --cache accepts in place of a spec."""
    from kvpack.calibrate import calibrate, calibrate_auto, reallocate
    from kvpack.models import DEFAULT_MODEL, load_model
    from kvpack.profile import load_profile

    output = Path(args.out)
    if not output.parent.is_dir():
        raise KVPackError(f"the folder of --out {output} does not exist.")
    if args.from_profile:  # another budget for measurements already made: no model run
        profile = reallocate(load_profile(args.from_profile), args.budget_bits)
    else:
        choose = args.base.strip().lower() == "auto"
        base = resolve_config(DEFAULT_PRESET if choose else args.base)  # bad arguments fail before the model loads
        if base.layer_bits:
            raise KVPackError(f"--base {args.base} already has per-layer bits; give a uniform spec (only bits vary).")
        candidates = tuple(parse_int_list(args.bits, "--bits"))
        if args.tokens < 2:
            raise KVPackError(f"--tokens {args.tokens}: calibration needs at least 2 tokens.")
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        name = args.model or DEFAULT_MODEL
        if choose:
            if args.method != "fisher":
                raise KVPackError("--base auto measures with the fisher method; leave --method out.")
            profile = calibrate_auto(model, tokenizer, args.budget_bits, candidates=candidates, tokens=args.tokens,
                                     data=args.data, model_name=name)  # fmt: skip
        else:
            profile = calibrate(model, tokenizer, args.budget_bits, base=base, candidates=candidates,
                                tokens=args.tokens, data=args.data, model_name=name, method=args.method)  # fmt: skip
    profile.save(output)
    print(profile_table(profile))
    source = f" (measurements of {args.from_profile})" if args.from_profile else ""
    print(f"wrote {output}{source}: use it with --cache {output}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """List the profiles `auto-<bits>` specs calibrated and stored (the profile store: $KVPACK_PROFILE_DIR, else
    $XDG_CACHE_HOME/kvpack/profiles, else ~/.cache/kvpack/profiles), or delete them: --clear-stale deletes those no
    longer used (chosen by an earlier procedure, or unreadable), --clear all of them (each is calibrated again when
    next asked for)."""
    from kvpack.cache.auto import AUTO_VERSION, profile_dir, stored_profiles

    stored = stored_profiles()
    doomed = [entry for entry in stored if args.clear or (args.clear_stale and not entry.current)]
    for entry in doomed:
        entry.path.unlink()
    if doomed:
        print(f"deleted {len(doomed)} of {len(stored)} stored profiles from {profile_dir()}")
        return 0
    if not stored:
        print(f"no stored profiles in {profile_dir()}")
        return 0
    rows = []
    for entry in stored:
        profile = entry.profile
        state = "current" if entry.current else (f"stale (v{entry.version}, now v{AUTO_VERSION})" if profile else
                                                  f"unreadable: {entry.error}")  # fmt: skip
        rows.append([
            entry.path.name,
            Path(profile.model.name).name if profile else entry.model_class,  # (a model folder: its name)
            f"{entry.budget_bits:g}",
            f"{profile.average_bits:.3f}" if profile else "",
            f"{profile.seconds:.0f} s" if profile else "",
            profile.created if profile else "",
            state,
        ])  # fmt: skip
    header = ["file", "model", "budget", "bits/value", "calibration", "created", "state"]
    print(f"{len(stored)} stored profiles in {profile_dir()}:")
    print("\n".join(markdown_table(header, rows)))
    return 0


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named options, as keyword arguments of the library function of the same parameter names."""
    return {name: getattr(args, name) for name in names}


def _measure_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`run_compare`'s model, text and weights settings, shared by `compare` and `ppl`."""
    weights = parse_list(args.weights, "--weights", choices=WEIGHT_CHOICES)
    return {"model_name": args.model, "weights": weights, **_pick(args, "tokens", "data", "dtype", "device")}


def cmd_compare(args: argparse.Namespace) -> int:
    """Stream a text through the model with each cache (PPL, ΔPPL, KL and top-1 vs the full-precision cache), then
    measure cache bytes and decode tokens/s at each context, interleaved. Writes JSON, Markdown and PNG."""
    out, caches = Path(args.out), parse_list(args.caches, "--caches")
    contexts = parse_int_list(args.contexts, "--contexts", allow_empty=True)
    earlier = json.loads(out.read_text()) if args.resume and out.exists() else None
    result = compare.run_compare(
        caches, **_measure_settings(args), contexts=contexts, steps=args.steps, checkpoint=lambda p: write_json(out, p),
        resume=earlier,
    )  # fmt: skip
    if result["contexts"]:
        publish(result, out, report.markdown, report.plot)
    else:
        write_json(out, result)
        print(report.markdown(result))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """Streamed perplexity of one cache, with KL and top-1 agreement vs the full-precision cache."""
    result = compare.run_compare([args.cache], **_measure_settings(args))
    if args.json:
        write_json(args.json, result)
    print(report.markdown(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown and PNG from a compare JSON."""
    md_path, png_path = report.write_report(Path(args.json))
    print(f"wrote {md_path} and {png_path}")
    return 0


def _eval_run(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """What `passkey` and `ruler` record of their run: the model's name and the command line."""
    from kvpack.models import DEFAULT_MODEL

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "json", "markdown", "png")}
    return {"model_name": args.model or DEFAULT_MODEL, "command": command_line(name, options)}


def cmd_passkey(args: argparse.Namespace) -> int:
    """Hide a random 5-digit pass key at several depths of a filler haystack of N tokens and ask for it back, with
    the full-precision cache and with kvpack caches; print the accuracy table and write JSON, Markdown and a heatmap
    PNG."""
    from kvpack.models import load_model

    caches = list(passkey.parse_caches(args.caches))
    lengths, depths = parse_int_list(args.lengths, "--lengths"), parse_float_list(args.depths, "--depths")
    passkey.check_settings(lengths, depths, args.trials)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    result = passkey.run_passkey(model, tokenizer, caches=caches, lengths=lengths, depths=depths,
                                 **_pick(args, "trials", "seed", "chat"), **_eval_run(args, "passkey"))  # fmt: skip
    publish(result, args.json, passkey.to_markdown, passkey.plot_heatmap, markdown_path=args.markdown,
            png_path=args.png, indent=1)  # fmt: skip
    return 0


def cmd_ruler(args: argparse.Namespace) -> int:
    """RULER's synthetic long-context tasks (needles in a haystack with several keys, values and queries; variable
    tracking), generated locally from a seed and asked of the full-precision cache and of kvpack caches; print the
    score tables (mean and 95% interval per task and length) and write JSON, Markdown and a PNG of score vs
    length."""
    from kvpack.harness.caches import load_timed_model

    specs = passkey.parse_caches(args.caches)
    tasks, lengths = ruler.parse_tasks(args.tasks), parse_int_list(args.lengths, "--lengths")
    ruler.check_settings(tasks, lengths, args.samples)
    # Through kvpack's attention, as `kvpack generate` decodes: kvpack caches use their fused kernel (dequantizing
    # the whole cache every step costs several times more at 4k-8k tokens); the fp cache still goes through SDPA.
    backends = [spec.backend for spec in specs.values()]
    model, tokenizer = load_timed_model(args.model, backends, dtype=args.dtype, device=args.device)
    settings = _pick(args, "samples", "seed", "chat", "checkpoint")
    result = ruler.run_ruler(model, tokenizer, caches=list(specs), tasks=tasks, lengths=lengths, **settings,
                             **_eval_run(args, "ruler"))  # fmt: skip
    publish(result, args.json, ruler.to_markdown, ruler.plot_accuracy, markdown_path=args.markdown,
            png_path=args.png, indent=1)  # fmt: skip
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    """Decode speed of kvpack's fused path vs full-precision caches and the peers (full model, interleaved), and the
    attention kernels alone vs fp32 SDPA and this machine's memory bandwidth. Writes JSON, Markdown and PNG."""
    result = decode.run_decode(
        parse_list(args.caches, "--caches"),
        parse_int_list(args.contexts, "--contexts"),
        backends=parse_list(args.backends, "--backends", allow_empty=True),
        kernel_threads=parse_int_list(args.kernel_threads, "--kernel-threads") if args.kernel_threads else (),
        model_name=args.model,
        **_pick(args, "steps", "profile_steps", "spec", "layers", "calls", "model_shape", "dtype", "device"),
    )
    publish(result, args.json, decode.to_markdown, decode.plot)
    return 0


def cmd_bench_persist(args: argparse.Namespace) -> int:
    """For each prefix length and cache spec: prefill + first token vs load (all checks) + first token, save and
    load times, and the file's size vs a float16 safetensors dump of the same tokens' DynamicCache. Writes JSON and
    Markdown."""
    result = persist.run_persist(
        parse_list(args.caches, "--caches"),
        parse_int_list(args.contexts, "--contexts"),
        model_name=args.model,
        **_pick(args, "suffix", "prefill_repeats", "repeats", "data", "dtype", "device", "tmp"),
    )
    publish(result, args.json, persist.to_markdown)
    return 0


def cmd_bench_long(args: argparse.Namespace) -> int:
    """Generate --tokens tokens greedily with a small random-weight Llama and a packed cache; check the packed bytes
    against the layout's formula at every sample and report the growth slopes and RSS. Writes JSON and Markdown; exits
    1 when a check fails."""
    names = ("tokens", "prompt", "spec", "backend", "runs", "sample_every", "warmup", "layers", "kv_heads", "head_dim")
    result = long_run.run_long(**_pick(args, *names))
    publish(result, args.json, long_run.to_markdown)
    return 1 if long_run.check(result) else 0


def cmd_bench_threads(args: argparse.Namespace) -> int:
    """Generate from several prompts with one shared model, sequentially and then from concurrent threads (each with
    its own cache); check that every thread's tokens and logits are bit-identical (exit 1 otherwise). Writes JSON and
    Markdown."""
    result = threads.run_threads(
        parse_list(args.caches, "--caches"),
        model_name=args.model,
        **_pick(args, "workers", "rounds", "tokens", "prompt_tokens", "dtype"),
    )
    publish(result, args.json, threads.to_markdown)
    return 0 if all(row["identical"] for row in result["rows"]) else 1


# -- options ----------------------------------------------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser, **options: tuple[Any, str]) -> None:
    """Declare `--name` (`_` in a name becomes `-`) for each `name=(default, help)`, typed as its default (a string
    when None); the help ends with the default."""
    for name, (default, text) in options.items():
        shown = "" if default is None else f" (default {default})"
        kind = str if default is None else type(default)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text + shown)


def _flags(parser: argparse.ArgumentParser, **flags: str) -> None:
    """Declare `--name` switches (`_` in a name becomes `-`), off by default, for each `name=help`."""
    for name, text in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)


def _results(parser: argparse.ArgumentParser, name: str, beside: str = ".md") -> None:
    _options(parser, json=(f"benchmarks/results/{name}.json", f"JSON path ({beside} beside it)"))


def _prompt_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("prompt", nargs="?", default="", help=f"{what} (appended after --prompt-file, if given)")
    parser.add_argument("--prompt-file", help="a text file to put before it (e.g. a document to ask about)")


def _generate_options(parser: argparse.ArgumentParser) -> None:
    _prompt_options(parser, "the prompt")
    _options(
        parser,
        cache=(None, f"a preset ({', '.join(PRESETS)}), a spec or a profile .json (default {DEFAULT_PRESET}, or the "
               "prefix cache's)"),
        prefix_cache=(None, "start from a prompt cache saved by `kvpack cache build`: the prompt is appended after "
                      "its prefix (or, with --prompt-file, must start with it)"),
    )  # fmt: skip
    add_model_options(parser)
    parser.add_argument(
        "--backend",
        choices=CACHE_BACKENDS,
        default="auto",
        help="attention on the packed cache: auto (the fastest available), cpu (C++ kernel), numba, torch, or dense "
        "(dequantize, then the model's own attention) (default auto)",
    )
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="fp", help="quantize the linear weights (quanto)")
    _flags(parser, no_chat="feed the raw prompt, without the chat template", sample="sample instead of greedy decoding")
    _options(parser, max_new_tokens=(64, "new tokens"), temperature=(0.7, "sampling"), top_p=(0.9, "sampling"))
    _options(parser, seed=(0, "sampling seed"))
    _flags(parser, check="also generate with a full-precision cache and compare")


def _cache_build_options(parser: argparse.ArgumentParser) -> None:
    _prompt_options(parser, "text to cache")
    parser.add_argument("-o", "--output", required=True, help="the file to write (e.g. doc.kvpc)")
    _options(parser, cache=(DEFAULT_PRESET, "preset, spec or profile"))
    add_model_options(parser)
    _flags(parser, no_chat="cache the raw text, without the chat template")


def _cache_info_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a file written by `kvpack cache build` or KVPackCache.save")
    _flags(parser, json="print the whole header as JSON (token ids included)")


def _chat_options(parser: argparse.ArgumentParser) -> None:
    _options(
        parser,
        cache=(None, f"a preset ({', '.join(PRESETS)}), a spec or a profile .json (default {DEFAULT_PRESET}, or the "
               "prefix cache's)"),
        system=(None, "a system message to start the conversation with"),
        prefix_cache=(None, "start from a prompt cache: a document from `kvpack cache build` (it starts the first user "
                      "message) or a conversation written by --save"),
        save=(None, "write the conversation's cache at the end (and its messages beside it, <file>.messages.json)"),
        max_new_tokens=(256, "new tokens per reply at most"),
    )  # fmt: skip
    add_model_options(parser)
    parser.add_argument(
        "--backend", choices=CACHE_BACKENDS, default="auto", help="attention on the packed cache (default auto)"
    )


def _measure_options(parser: argparse.ArgumentParser) -> None:
    _options(parser, tokens=(2048, "tokens of the text to stream"), data=(str(default_data_path()), "the text"))
    add_model_options(parser, threads_default=2)
    _options(parser, weights=("fp", "weight formats among fp,int8,int4 (optimum-quanto): every cache runs with each, "
                              "and fp weights with the fp cache stay the reference"))  # fmt: skip


def _compare_options(parser: argparse.ArgumentParser) -> None:
    _options(parser, caches=("fp,k8v8,k4v4,k4v2,k2v2,quanto-int4,quanto-int2,hqq-int8,hqq-int4-axis1", "caches"))
    _measure_options(parser)
    _options(parser, contexts=("1024,4096", "decode-speed contexts"), steps=(16, "timed decode steps per context"))
    _options(parser, out=("benchmarks/results/compare.json", "JSON path (.md and .png beside it)"))
    _flags(parser, resume="keep the rows --out holds (a run cut off, or earlier caches) and stream only the caches it "
                          "lacks; the model, text, tokens and weights must be the same")  # fmt: skip


def _ppl_options(parser: argparse.ArgumentParser) -> None:
    _options(parser, cache=(DEFAULT_PRESET, "cache: kvpack preset or spec, fp, or a peer like quanto-int4"))
    _measure_options(parser)
    _options(parser, json=(None, "also write the result as JSON"))


def _calibrate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-bits", type=float, required=True, help="average bits per value, metadata included")
    _options(
        parser,
        base=(
            DEFAULT_PRESET,
            "spec whose options are kept, only bits vary; 'auto': choose the options too "
            "(kvpack.calibrate.AUTO_BASES, what auto-<bits> specs use; fisher method)",
        ),
        bits=("2,3,4,8", "candidate bit widths"),
        tokens=(512, "calibration tokens"),
        data=(None, "a UTF-8 text file (default: kvpack's calibration text)"),
    )
    parser.add_argument(
        "--method", choices=METHODS, default=DEFAULT_METHOD,
        help="fisher: every KL estimated from one forward and backward pass (fast); emulate: one forward of the "
             "layers after each perturbed one per measurement (the exact emulated KL, minutes) (default %(default)s)",
    )  # fmt: skip
    add_model_options(parser)
    parser.add_argument("-o", "--out", required=True, help="the profile to write (e.g. profile.json)")
    parser.add_argument(
        "--from",
        dest="from_profile",
        help="re-allocate the measurements of this profile within --budget-bits (no model run; its model, base, "
        "bits and text are kept, the other options are ignored)",
    )


def _eval_options(parser: argparse.ArgumentParser, module: Any, png: str, **settings: tuple[Any, str]) -> None:
    """The options of the evaluation `module` (`kvpack.eval.passkey` or `.ruler`): caches (its default), `settings`,
    --chat, the model's options and the result's paths."""
    name = module.__name__.rpartition(".")[2]
    _options(parser, caches=(",".join(module.DEFAULT_CACHES), "fp, kvpack specs, peers"), **settings)
    _flags(parser, chat="wrap the prompt in the tokenizer's chat template")
    add_model_options(parser)
    path = f"benchmarks/results/{name}"
    _options(parser, json=(f"{path}.json", "JSON path"), markdown=(f"{path}.md", "Markdown path"))
    _options(parser, png=(f"{path}.png", png))


def _lengths(default: tuple[int, ...]) -> tuple[str, str]:
    return ",".join(map(str, default)), "total prompt tokens, up to the model's max context"


def _passkey_options(parser: argparse.ArgumentParser) -> None:
    _eval_options(
        parser,
        passkey,
        "heatmap PNG path",
        lengths=_lengths(passkey.DEFAULT_LENGTHS),
        depths=(",".join(map(str, passkey.DEFAULT_DEPTHS)), "needle depths in [0, 1]"),
        trials=(passkey.DEFAULT_TRIALS, "keys per (length, depth) cell"),
        seed=(0, "seed of the random keys"),
    )


def _ruler_options(parser: argparse.ArgumentParser) -> None:
    resume = "JSON Lines file each finished sample is appended to; run again with it to ask only what it lacks"
    _eval_options(
        parser,
        ruler,
        "score-vs-length PNG path",
        tasks=(",".join(ruler.DEFAULT_TASKS), "RULER tasks, or all"),
        lengths=_lengths(ruler.DEFAULT_LENGTHS),
        samples=(ruler.DEFAULT_SAMPLES, "prompts per (task, length) cell"),
        seed=(0, "seed of the random keys, values and depths"),
    )
    _options(parser, checkpoint=(None, resume + " (a run cut off, more samples, lengths or caches)"))


def _bench_decode_options(parser: argparse.ArgumentParser) -> None:
    _options(
        parser,
        caches=("fp,fp-prealloc,k8v8,k4v4,k2v2,k4v4@dense,quanto-int4", "caches"),
        contexts=("1024,4096,8192", "decode contexts, capped to fit the model"),
        steps=(16, "timed decode steps per cache and context"),
        profile_steps=(4, "instrumented steps per cache and context (0: none)"),
        backends=("cpu,numba,torch", "kernels timed alone ('' to skip)"),
        spec=("k4v4", "cache spec of the attention-only measurement"),
        layers=(30, "layer caches to rotate over"),
        calls=(60, "timed calls per kernel and context"),
        kernel_threads=("1,2", "torch thread counts the kernels alone are timed at ('': --threads only)"),
        model_shape=(None, "a random-weight model of this shape instead of --model, its caches filled with random "
                     f"keys and values (no prefill): {', '.join(MODEL_SHAPES)}"),
    )  # fmt: skip
    add_model_options(parser, threads_default=2)
    _results(parser, "decode", ".md and .png")


def _bench_persist_options(parser: argparse.ArgumentParser) -> None:
    _options(
        parser,
        caches=("k4v4,k8v8", "kvpack specs"),
        contexts=("1024,4096,8192", "prefix lengths, capped to fit the model"),
        suffix=(16, "tokens after the prefix (the question)"),
        prefill_repeats=(2, "prefills timed per cache"),
        repeats=(7, "loads timed per file"),
        data=(str(default_data_path()), "the text"),
        tmp=(None, "directory for the files (default: the system's temporary one)"),
    )
    add_model_options(parser, threads_default=2)
    _results(parser, "persist")


def _bench_long_options(parser: argparse.ArgumentParser) -> None:
    _options(parser, tokens=(16384, "new tokens per run"), prompt=(64, "prompt tokens"), spec=("k4v4", "cache spec"))
    parser.add_argument("--backend", choices=CACHE_BACKENDS, default="auto", help="attention (dense: no fused path)")
    _options(
        parser,
        runs=(2, "generations, each with a fresh cache"),
        sample_every=(256, "tokens between samples"),
        warmup=(1024, "tokens left out of the slopes"),
        layers=(4, "layers of the random-weight Llama"),
        kv_heads=(4, "its KV heads"),
        head_dim=(64, "its head dim"),
        threads=(1, "torch CPU threads"),
    )
    _results(parser, "long_run")


def _bench_threads_options(parser: argparse.ArgumentParser) -> None:
    _options(
        parser,
        caches=("k8v8,k4v4,k4v4@dense,k2v2", "specs, @backend allowed"),
        workers=(4, "threads (and prompts)"),
        rounds=(2, "concurrent rounds"),
        tokens=(24, "new tokens per prompt"),
        prompt_tokens=(256, "tokens of the first prompt"),
    )
    add_model_options(parser, threads_default=1, device=False, threads_flag="--torch-threads")
    _results(parser, "concurrency")


def cmd_memory(args: argparse.Namespace) -> int:
    """Exact KV-cache bytes by batch size x sequence length for a model config (no weights loaded), the ratio vs a
    float16 cache, optional weight memory and the max context that fits in a memory budget. --measure fills real
    caches for a few cells and checks the numbers against nbytes() and process memory."""
    import torch

    caches = parse_list(args.caches, "--caches")
    batches = parse_int_list(args.batch, "--batch")
    lengths = parse_int_list(args.lengths, "--lengths")
    weights = parse_list(args.weights, "--weights", choices=memory.WEIGHT_FORMATS) if args.weights else None
    for name in caches:
        memory.parse_cache(name)  # a bad spec fails before the config loads
    config, model_name = memory.load_config(args.model)
    table = memory.memory_table(
        config, caches, batches, lengths, args.dtype, weights=weights, budget_gib=args.budget_gib
    )
    measure = args.measure
    options = {
        "model": args.model, "caches": args.caches, "batch": args.batch, "lengths": args.lengths, "dtype": args.dtype,
        "weights": args.weights, "budget_gib": None if args.budget_gib is None else f"{args.budget_gib:g}",
        "measure": measure, "device": args.device if measure else None, "threads": args.threads if measure else None,
        "measure_max_gib": f"{args.measure_max_gib:g}"
        if measure and args.measure_max_gib != memory.MEASURE_MAX_GIB else None,
        "json": args.json, "markdown": args.markdown,
    }  # fmt: skip
    header = provenance("memory", command=command_line("memory", options), device=str(torch.device(args.device)))
    result: dict[str, Any] = {**header, "model_name": model_name, **table}
    if measure:
        cells = memory.default_measure_cells(batches, lengths)
        print(f"Measuring {len(cells)} cells x {len(caches)} caches on {args.device} ...", file=sys.stderr, flush=True)
        result["measurements"] = memory.measure_cells(
            config, caches, cells, args.dtype, device=args.device, max_gib=args.measure_max_gib
        )
    markdown = memory.to_markdown(result)
    if args.json:
        print(f"wrote {write_json(args.json, result)}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown, encoding="utf-8")
        print(f"wrote {args.markdown}", file=sys.stderr)
    print(markdown)
    return 0


def _memory_options(parser: argparse.ArgumentParser) -> None:
    _options(
        parser,
        model=(None, "a config .json, a .gguf, a local model dir or a cached HF id; only the config is read "
               "(default: the embedded SmolLM2-135M)"),
        caches=(memory.DEFAULT_CACHES, "fp16/bf16/fp32 and kvpack specs"),
        batch=(memory.DEFAULT_BATCHES, "batch sizes"),
        lengths=(memory.DEFAULT_LENGTHS, "sequence lengths in tokens"),
    )  # fmt: skip
    parser.add_argument(
        "--dtype",
        choices=tuple(memory.MODEL_DTYPES),
        default=memory.DEFAULT_DTYPE,
        help="the model's dtype, in which kvpack keeps residual and sink tokens (default float16, as models are "
        "usually served; fp16/bf16/fp32 caches use their own dtype)",
    )
    _options(parser, weights=(None, "also count weights in these formats: fp16,int8,int4"))
    parser.add_argument("--budget-gib", type=float, default=None, help="max context that fits in this many GiB")
    _flags(parser, measure="fill real caches for a few cells and check the numbers")
    _options(
        parser,
        device=("cpu", "device for --measure: cpu, cuda ..."),
        threads=(1, "torch CPU threads for --measure (1: the fills are small)"),
        measure_max_gib=(memory.MEASURE_MAX_GIB, "skip measured cells whose largest cache exceeds this many GiB"),
        json=(None, "write the result as JSON here"),
        markdown=(None, "write the Markdown report here"),
    )


Options = Callable[[argparse.ArgumentParser], object]
Handler = Callable[[argparse.Namespace], int]

# The command line, one row per subcommand: its one-line help, what declares its options, its handler (whose
# docstring is the command's --help description). A group (`cache`, `bench`) comes first in a name; GROUPS gives its
# help and the metavar of its commands.
COMMANDS: dict[str, tuple[str, Options, Handler]] = {
    "generate": ("generate text with a packed cache; print size and speed", _generate_options, cmd_generate),
    "chat": ("a conversation from stdin on one packed cache kept across turns", _chat_options, cmd_chat),
    "cache build": ("prefill a document into a packed cache and save it", _cache_build_options, cmd_cache_build),
    "cache info": ("show a prompt cache's header", _cache_info_options, cmd_cache_info),
    "compare": ("quality, memory and speed of several caches, side by side", _compare_options, cmd_compare),
    "ppl": ("streamed perplexity of a cache, with KL and top-1 vs fp", _ppl_options, cmd_ppl),
    "calibrate": ("per-layer bits within a budget, from measured sensitivity; writes a profile", _calibrate_options,
                  cmd_calibrate),
    "report": ("Markdown tables and PNG plots from a compare JSON",
               lambda p: p.add_argument("json", help="a JSON written by `kvpack compare`"), cmd_report),
    "memory": ("cache memory by batch × length for a model config", _memory_options, cmd_memory),  # noqa: RUF001
    "passkey": ("passkey retrieval by length and depth, fp vs quantized", _passkey_options, cmd_passkey),
    "ruler": ("RULER's long-context tasks (multi-needle, variable tracking), fp vs quantized", _ruler_options,
              cmd_ruler),
    "bench decode": ("decode tokens/s of each cache and attention µs per call, side by side", _bench_decode_options,
                     cmd_bench_decode),
    "bench persist": ("loading a saved prompt cache vs recomputing the prefill; file size vs a float16 dump",
                      _bench_persist_options, cmd_bench_persist),
    "bench long": ("a 16k-token generation: exact cache growth and process memory", _bench_long_options,
                   cmd_bench_long),
    "bench threads": ("several threads, each with its own cache, vs the same work sequentially",
                      _bench_threads_options, cmd_bench_threads),
    "profiles": ("the profiles auto-<bits> specs calibrated and stored; delete stale ones",
                 lambda p: _flags(p, clear="delete every stored profile", clear_stale="delete the stale ones"),
                 cmd_profiles),
    "doctor": ("which attention backend this machine gets, and why", lambda p: None, cmd_doctor),
    "spec": ("explain a cache spec string (bits, groups, residual, sinks)",
             lambda p: p.add_argument("spec", help="e.g. k4v2-g32-r64-s4"), cmd_spec),
}  # fmt: skip
GROUPS = {
    "cache": ("prompt caches on disk: build one from a document, show one", "<cache command>",
              "Prompt caches: the packed cache of a reusable prefix (a document, a system prompt), saved to disk and "
              "loaded by `kvpack generate --prefix-cache FILE` instead of recomputing the prefill."),
    "bench": ("benchmarks: decode speed, prompt caches on disk, long runs, threads", "<benchmark>", None),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `kvpack` parser: one subparser per row of `COMMANDS` (a group's own subparser first, the first time)."""
    parser = argparse.ArgumentParser(
        prog="kvpack", description="Quantized, packed key/value caches for transformer language models."
    )
    top = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    groups: dict[str, Any] = {}
    for name, (text, options, handler) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            text_of_group, metavar, description = GROUPS[group]
            group_parser = top.add_parser(group, help=text_of_group, description=description)
            groups[group] = group_parser.add_subparsers(dest=group, metavar=metavar, required=True)
        sub = (groups[group] if group else top).add_parser(leaf, help=text, description=handler.__doc__)
        options(sub)
        sub.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `kvpack` with `argv` (default the process's); returns the exit status (2 for a KVPackError)."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", 0):
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args))
    except KVPackError as exc:
        print(f"kvpack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
