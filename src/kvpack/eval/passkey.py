"""Passkey retrieval: can the model still find a number hidden deep in a long prompt when its cache is packed?

The classic test of the Landmark-attention and LongLoRA papers: a random 5-digit pass key is hidden at a chosen
depth of a haystack of repeated filler sentences, and the prompt ends by asking for it::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
    you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 48213. Remember it. 48213 is the pass key.
    ... There and back again. The grass is green.
    What is the pass key? The pass key is

The prompt is built to an exact token count with the model's own tokenizer (the total prompt, template
included: at most the target and fewer than one filler sentence short of it), with the needle on its own line
at the sentence boundary nearest the requested depth (depth = the fraction of the filler tokens before it).
The model greedily generates up to `MAX_NEW_TOKENS` tokens with the cache under test passed to
`model.generate(..., cache=cache)`; a trial is correct when the first 5-digit number of the output
is the pass key. The same keys (seeded per length, depth and trial) are asked of every cache.

All but the last prompt token are run through the model once, into a full-precision cache, and each cache under
test is handed those keys/values: exactly what its own prefill would store, since a kvpack prefill attends to its
own tokens in full precision (KIVI) and stores the same however the tokens arrive. `generate` then feeds the last
prompt token, which, like every answer token, attends to the cache under test. A length equal to the model's
maximum context runs `MAX_NEW_TOKENS` tokens shorter, to leave room for the answer; a longer one is an error.

The prompt is raw text by default: the embedded default model (SmolLM2-135M-Instruct) answers it better than
the same text inside its chat template (which it sometimes answers with "the pass key. The pass key is").
`chat=True` (`--chat`) wraps the same text in the tokenizer's chat template, with "The pass key is" as the start
of the assistant's answer.

Results: a JSON-ready dict (`run_passkey`), a Markdown table (`to_markdown`) and a heatmap (`plot_heatmap`), both
made from the JSON form.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from kvpack.cache.plan import context_limit
from kvpack.compat import cache_kwargs
from kvpack.errors import ConfigError
from kvpack.harness.caches import CacheSpec, make_cache, parse_cache_name, resolve_auto
from kvpack.harness.results import markdown_page, markdown_table, parse_list, provenance, timed

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_SENTENCES = tuple(s.strip() + "." for s in FILLER.split(".") if s.strip())
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"

MAX_NEW_TOKENS = 8
DEFAULT_CACHES = ("fp", "k8v8", "k4v4", "k2v2")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_TRIALS = 3

_FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")


class TokenizedPrompt(Protocol):
    """What `prefill` and `generate_answer` read of a prompt (a `PasskeyPrompt`, or another evaluation's): its
    token ids, special tokens included."""

    @property
    def input_ids(self) -> list[int]: ...


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt, tokenized.

    input_ids: the prompt's token ids (special tokens included), `n_tokens` of them.
    text: the prompt as text (the chat template applied when built with `chat=True`).
    passkey: the hidden 5-digit key, as a string.
    needle_token: index in `input_ids` of the first token of the needle line.
    haystack_tokens: filler tokens in the prompt (before plus after the needle).
    depth: the needle's actual depth: filler tokens before it / `haystack_tokens`.
    """

    input_ids: list[int]
    text: str
    passkey: str
    needle_token: int
    haystack_tokens: int
    depth: float

    @property
    def n_tokens(self) -> int:
        """Total prompt tokens."""
        return len(self.input_ids)


def sentence_tokens(tokenizer: Any) -> list[int]:
    """Tokens of each filler sentence as it appears mid-line, after a space: what places a needle at a depth."""
    return [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER_SENTENCES]


def filler_tokens(counts: Sequence[int], n_sentences: int) -> list[int]:
    """Filler tokens before each sentence boundary 0..n_sentences (`counts`: `sentence_tokens`, repeating)."""
    return [0, *itertools.accumulate(counts[i % len(counts)] for i in range(n_sentences))]


def nearest_boundaries(n_sentences: int, depths: Sequence[float], counts: Sequence[int] = (1,)) -> list[int]:
    """For each depth, the sentence boundary (0..n_sentences) whose share of the filler's tokens is nearest to it
    (ties to the earlier one); ascending when `depths` are."""
    cumulative = filler_tokens(counts, n_sentences)
    return [min(range(n_sentences + 1), key=lambda k: (abs(cumulative[k] - d * cumulative[-1]), k)) for d in depths]


def encode(tokenizer: Any, text: str, chat: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """A prompt's token ids and character offsets. The chat template writes its own special tokens; a raw prompt
    gets the tokenizer's usual ones (e.g. BOS)."""
    encoded = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def most_filler(tokenizer: Any, render: Callable[[int], tuple[str, Any]], n_tokens: int, chat: bool, what: str,
                advice: str = "") -> int:  # fmt: skip
    """The most filler sentences n whose prompt (the text `render(n)` returns first) is at most `n_tokens` tokens.
    Raises ConfigError (naming `what` and ending with `advice`) when the prompt without filler is longer."""

    def length(n: int) -> int:
        return len(encode(tokenizer, render(n)[0], chat)[0])

    if (fixed := length(0)) > n_tokens:
        raise ConfigError(f"{what} needs at least {fixed} tokens without filler; {n_tokens} is too short{advice}.")
    # The prompt grows with its filler (each sentence at least a token: fewer sentences than tokens), so bisect;
    # whatever the probes, the index found was probed and fits.
    return bisect.bisect_right(range(n_tokens), n_tokens, key=length) - 1


def _render(tokenizer: Any, n_sentences: int, depth: float, passkey: str, chat: bool, counts: Sequence[int]
            ) -> tuple[str, int]:  # fmt: skip
    """(prompt text, character offset of the needle) for `n_sentences` of filler."""
    before = nearest_boundaries(n_sentences, [depth], counts)[0]
    sentences = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n_sentences)]
    prefix, suffix = " ".join(sentences[:before]), " ".join(sentences[before:])
    needle = NEEDLE.format(key=passkey)
    head = "\n".join(part for part in (INTRO, prefix) if part) + "\n"
    body = head + needle + "\n" + "\n".join(part for part in (suffix, QUESTION) if part)
    if chat:
        messages = [{"role": "user", "content": body}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ANSWER_PREFIX
    else:
        text = body + " " + ANSWER_PREFIX
    return text, text.index(needle)


def build_prompt(tokenizer: Any, n_tokens: int, depth: float, passkey: str, chat: bool = False) -> PasskeyPrompt:
    """Build a passkey prompt of at most `n_tokens` tokens, less than one filler sentence short of it.

    tokenizer: a fast Hugging Face tokenizer (offsets are used to locate the needle), with a chat template when
        `chat`. depth: 0..1, where the needle goes in the filler (at the nearest sentence boundary).
    Raises ConfigError when `n_tokens` is too small to hold the fixed parts (instructions, needle, question)
    or `depth` is outside [0, 1].
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth {depth} is outside [0, 1]; give depths as fractions, e.g. 0.1,0.5,0.9.")

    render = partial(_render, tokenizer, depth=depth, passkey=passkey, chat=chat, counts=sentence_tokens(tokenizer))
    text, needle_at = render(most_filler(tokenizer, render, n_tokens, chat, "a passkey prompt"))
    ids, offsets = encode(tokenizer, text, chat)
    needle_token = next(i for i, (_, end) in enumerate(offsets) if end > needle_at)
    filler_before = _tokens_between(text, offsets, text.index(INTRO) + len(INTRO), needle_at)
    needle_end = needle_at + len(NEEDLE.format(key=passkey))
    filler_after = _tokens_between(text, offsets, needle_end, text.rindex(QUESTION))
    haystack = filler_before + filler_after
    return PasskeyPrompt(ids, text, passkey, needle_token, haystack, filler_before / haystack if haystack else 0.0)


def _tokens_between(text: str, offsets: list[tuple[int, int]], start: int, end: int) -> int:
    """Tokens whose text lies inside text[start:end], line breaks and other whitespace-only tokens left out."""
    return sum(1 for a, b in offsets if a >= start and b <= end and text[a:b].strip())


def passkey_for(seed: int, n_tokens: int, depth: float, trial: int) -> str:
    """The 5-digit key of one trial: fixed by (seed, length, depth, trial), the same for every cache."""
    return str(random.Random(f"passkey/{seed}/{n_tokens}/{depth:g}/{trial}").randint(10000, 99999))


def extract_passkey(output: str) -> str | None:
    """The first 5-digit number in `output` (a run of exactly five digits), or None."""
    return match.group(0) if (match := _FIVE_DIGITS.search(output)) else None


def is_correct(output: str, passkey: str) -> bool:
    """Whether the first 5-digit number in the generated text is the pass key."""
    return extract_passkey(output) == passkey


def parse_caches(names: str | Sequence[str]) -> dict[str, CacheSpec]:
    """Cache names as `kvpack compare` takes them ("fp", kvpack specs, peers), each once, keyed by the name results
    use: the canonical spec (k4v4 -> k4v4-g64-r128), or a profile's path (its label, profile:<stem>, does not parse
    back). Raises ConfigError for an unknown name or none."""
    specs: dict[str, CacheSpec] = {}
    for name in parse_list(names, "--caches"):
        spec = parse_cache_name(name)
        specs.setdefault(spec.profile or spec.name, spec)
    return specs


def fit_lengths(lengths: Sequence[int], context: int, new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Prompt lengths that leave room for `new_tokens` in a `context`-token model, sorted, each once.

    A length beyond `context` raises ConfigError. A length that fits but leaves no room for the generated
    tokens becomes `context - new_tokens` (so the default 8192 on an 8192-token model runs at 8184).
    """
    if too_long := [n for n in lengths if n > context]:
        raise ConfigError(
            f"--lengths {','.join(map(str, too_long))} exceed the model's maximum context of {context} tokens "
            f"(max_position_embeddings); use lengths up to {context} (the largest is run at {context - new_tokens} "
            f"to leave room for {new_tokens} generated tokens)."
        )
    return sorted({min(n, context - new_tokens) for n in lengths})


def context_notes(lengths: Sequence[int], context: int, new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The result's note when `fit_lengths` shortened a requested length to leave room for `new_tokens`."""
    if not any(n > context - new_tokens for n in lengths):
        return []
    return [
        f"lengths are whole-prompt tokens; {context} is the model's maximum context, so the longest prompt is "
        f"{context - new_tokens} tokens, leaving room for {new_tokens} generated tokens"
    ]


def check_settings(lengths: Sequence[int], depths: Sequence[float], trials: int) -> None:
    """Raise ConfigError unless every length and `trials` is positive and every depth is in [0, 1]."""
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"lengths {list(lengths)}: give positive token counts, e.g. 1024,2048,4096.")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"depths {list(depths)}: give fractions in [0, 1], e.g. 0.1,0.5,0.9.")
    if trials < 1:
        raise ConfigError(f"trials {trials}: give at least 1 trial per cell.")


def prefill(model: Any, prompt: TokenizedPrompt) -> Any | None:
    """All but the last prompt token, run once through the model into a full-precision `DynamicCache`.

    Returns None for models with sliding-window layers, whose DynamicCache forgets tokens a kvpack cache must
    still see arrive; each cache then runs its own prefill.
    """
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt.input_ids[:-1]], device=model.device)
    cache = DynamicCache(config=model.config)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    with torch.inference_mode():
        model(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def filled_cache(spec: CacheSpec, model_config: Any, prefilled: Any | None) -> Any:
    """A fresh cache of kind `spec` holding the keys/values of `prefilled`, when given.

    This is what a prefill with that cache itself would store: a prefill attends to its own tokens in full
    precision (kvpack stores what it is given, split into calls or not), so the prompt is run through the
    model once for every cache under test.
    """
    cache = make_cache(spec, model_config)
    if prefilled is not None:
        for idx, layer in enumerate(prefilled.layers):
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                cache.update(layer.keys, layer.values, idx)
    return cache


def generate_answer(
    model: Any, tokenizer: Any, prompt: TokenizedPrompt, cache: Any, max_new_tokens: int = MAX_NEW_TOKENS
) -> str:
    """Greedy-generate up to `max_new_tokens` tokens after `prompt` with `cache`; the new text.

    `cache` may be empty or already hold a prefix of the prompt (see `filled_cache`); `generate` feeds the rest.
    """
    import torch

    ids = torch.tensor([prompt.input_ids], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def run_passkey(
    model: Any,
    tokenizer: Any,
    *,
    caches: str | Sequence[str] = DEFAULT_CACHES,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    chat: bool = False,
    model_name: str | None = None,
    command: str | None = None,
    progress: bool = True,
    shared_prefill: bool = True,
) -> dict[str, Any]:
    """Measure passkey accuracy per (length, depth) for each cache; the JSON-ready result.

    Every (length, depth, trial) prompt is asked of every cache in turn. With `shared_prefill` (the default), each
    prompt's prefill runs once and is handed to every cache (see `filled_cache`). Lengths are total prompt tokens; one
    beyond the model's maximum context raises ConfigError before anything runs (see `fit_lengths`), as do the
    settings `check_settings` refuses. command: what the result records (default the running command line). The
    result holds the run's settings, machine and versions, `accuracy[cache][length][depth]` (string keys, e.g.
    accuracy["fp"]["1024"]["0.5"]) and one record per generation in `runs`.
    """
    from tqdm import tqdm

    specs = parse_caches(caches)
    check_settings(lengths, depths, trials)
    resolve_auto(specs.values(), model, tokenizer)
    requested, depths = sorted(set(lengths)), sorted(set(depths))
    context = context_limit(model.config)
    lengths = fit_lengths(requested, context)
    notes = context_notes(requested, context)

    # Longest prompts first: a memory problem shows at once, and the ETA errs long rather than short.
    cells = [(n, d, t) for n in reversed(lengths) for d in depths for t in range(trials)]
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    total = sum(n for n, _, _ in cells)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="passkey", disable=not progress, file=sys.stderr) as bar:
        for n_tokens, depth, trial in cells:
            bar.set_postfix_str(f"{n_tokens} tokens, depth {depth:g}, trial {trial + 1}/{trials}")
            key = passkey_for(seed, n_tokens, depth, trial)
            prompt = build_prompt(tokenizer, n_tokens, depth, key, chat=chat)
            prefilled, prefill_s = timed(prefill, model, prompt) if shared_prefill else (None, 0.0)
            for name, spec in specs.items():
                generate_start = time.perf_counter()
                output = generate_answer(model, tokenizer, prompt, filled_cache(spec, model.config, prefilled))
                runs.append({
                    "cache": name, "length": n_tokens, "depth": depth, "trial": trial, "passkey": key,
                    "prompt_tokens": prompt.n_tokens, "needle_token": prompt.needle_token,
                    "needle_depth": round(prompt.depth, 4), "output": output, "answer": extract_passkey(output),
                    "correct": is_correct(output, key),
                    "shared_prefill_s": round(prefill_s, 3) if prefilled is not None else None,
                    "generate_s": round(time.perf_counter() - generate_start, 3),
                })  # fmt: skip
            bar.update(n_tokens)

    def score(cell: tuple[str, int, float]) -> float:
        return _mean([r["correct"] for r in runs if (r["cache"], r["length"], r["depth"]) == cell])

    accuracy = {name: {str(n): {f"{d:g}": score((name, n, d)) for d in depths} for n in lengths} for name in specs}
    return {
        **provenance("passkey", model, model_name or getattr(model.config, "name_or_path", None), command=command),
        "prompt": "chat" if chat else "raw",
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_context": context,
        "requested_lengths": requested,
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "caches": list(specs),
        "shared_prefill": any(r["shared_prefill_s"] is not None for r in runs),
        "notes": notes,
        "accuracy": accuracy,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "runs": runs,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def to_markdown(result: dict[str, Any]) -> str:
    """A Markdown report of a `run_passkey` result: one row per cache x length, one column per depth, and mean; then
    one row per cache, one column per length."""
    depths, lengths, accuracy = [f"{d:g}" for d in result["depths"]], result["lengths"], result["accuracy"]
    intro = (
        f"A random 5-digit pass key hidden at each depth of a filler haystack ({result['prompt']} prompt, "
        f"{result['dtype']}); length = total prompt tokens. Greedy decoding of up to {result['max_new_tokens']} "
        f"tokens; correct when the first 5-digit number of the answer is the key. Accuracy over "
        f"{result['trials']} keys per cell (seed {result['seed']}); the same keys for every cache. "
        f"Run time {result['elapsed_s'] / 60:.1f} min."
    )
    if result.get("shared_prefill"):
        intro += (
            " Each prompt but its last token is run through the model once, in full precision, and handed to every "
            "cache: what that cache's own prefill stores (a kvpack prefill attends to itself exactly); the last "
            "prompt token and the answer attend to the cache under test."
        )
    lines = [intro]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}."]
    fp = accuracy.get("fp")
    missed = [f"{n} tokens at depth {d}" for n in lengths for d in depths if fp and fp[str(n)][d] < 1]
    if missed:
        lines += [
            "",
            f"The full-precision cache itself misses some keys ({'; '.join(missed)}): there the limit is "
            "the model's, not the quantized caches'.",
        ]
    cells = {(name, n): [accuracy[name][str(n)][d] for d in depths] for name in result["caches"] for n in lengths}
    rows = [[name, n, *(f"{a:.0%}" for a in [*cell, _mean(cell)])] for (name, n), cell in cells.items()]
    header = ["cache", "length", *(f"depth {d}" for d in depths), "mean"]
    lines += ["", *markdown_table(header, rows, "lr" + "r" * len(depths) + "r")]
    per_length = {name: [_mean(cells[name, n]) for n in lengths] for name in result["caches"]}
    rows = [[name, *(f"{a:.0%}" for a in means), f"{_mean(means):.0%}"] for name, means in per_length.items()]
    lines += [
        "",
        *markdown_table(["cache", *(f"{n} tokens" for n in lengths), "all"], rows, "l" + "r" * (len(lengths) + 1)),
    ]
    return markdown_page(f"Passkey retrieval: {result['model']}, {result['date'][:10]}", result, [], lines)


def plot_heatmap(result: dict[str, Any], path: str | Path) -> None:
    """Write a PNG heatmap of a `run_passkey` result: one panel per cache, x = depth, y = length, colour = accuracy."""
    # matplotlib is imported here only: importing kvpack must stay light. Figure (no pyplot) needs no backend state.
    from matplotlib.figure import Figure

    caches, lengths, depths = result["caches"], result["lengths"], [f"{d:g}" for d in result["depths"]]
    fig = Figure(figsize=(1.2 + 2.9 * len(caches), 0.9 + 0.45 * len(lengths) + 0.8), layout="constrained")
    axes = fig.subplots(1, len(caches), squeeze=False, sharey=True)[0]  # at least one cache: a result has one
    for ax, name in zip(axes, caches, strict=True):
        grid = [[result["accuracy"][name][str(n)][d] for d in depths] for n in lengths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(depths)), depths)
        ax.set_xlabel("needle depth")
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    axes[0].set_ylabel("prompt tokens")
    fig.colorbar(image, ax=list(axes), label="accuracy", shrink=0.9)
    fig.suptitle(f"Passkey retrieval, {result['model']} ({result['trials']} keys per cell)", fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
