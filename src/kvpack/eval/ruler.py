"""RULER's synthetic long-context tasks: several needles, several values, several questions, variable chains.

RULER (Hsieh et al. 2024, "RULER: What's the real context size of your long-context language models?") asks more of
a long context than one pass key. Five of its tasks, with its templates (github.com/NVIDIA/RULER,
`scripts/data/synthetic/constants.py`, `niah.py`, `variable_tracking.py`) and its "noise" haystack (the passkey
filler, one line per passage), generated here without its data files:

    niah_single      one needle, "One of the special magic numbers for {key} is: {7-digit number}."; asked for it
    niah_multikey    four needles with different keys; asked for one key's number (three distractors)
    niah_multivalue  four needles with one key and four numbers; all four asked for
    niah_multiquery  four needles with different keys; all four keys asked for at once
    vt               variable tracking: a chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... (five variables,
                     four hops) spread through the haystack, after a worked example of the same kind with a short
                     haystack (RULER's one-shot example); asked which variables hold 12345

Keys are adjective-noun words (RULER draws them from wonderwords' lists; here from `ADJECTIVES` x `NOUNS`), values
7-digit numbers (niah) and variables five capital letters (vt). Everything a sample holds (keys, values, variables,
which key is asked, where each needle goes) is drawn from `random.Random` seeded by (seed, task, length, sample),
so every cache is asked the same prompts. Needles sit on their own lines at sentence boundaries, at depths drawn,
like RULER's essay haystack, from 40 evenly spaced fractions of the haystack (distinct within a sample; a chain's
lines in order, niah's needles shuffled); depth = filler tokens before the needle / all filler tokens.

A prompt is the task's template with the haystack, then RULER's answer prefix (e.g. "... What is the special magic
number for dull-river mentioned in the provided text? The special magic number for dull-river mentioned in the
provided text is"), built to at most the target token count with the model's tokenizer (the most filler sentences
that fit, by bisection, as `kvpack.eval.passkey` builds its prompts; less than one sentence short of the target).
RULER's vt answer prefix ends with a space ("they are: "), dropped here: a BPE tokenizer starts its words with the
space, so a prompt ending in one asks for an unusual token. `chat=True` wraps the template's text in the tokenizer's
chat template and starts the assistant's answer with the prefix.

Generation is greedy, up to the task's `max_new_tokens` (enough for the full answer with the default model's
tokenizer, which spells numbers digit by digit). Scoring is RULER's `string_match_all`: a sample scores the fraction
of its expected values found (case-insensitive substrings) in the generated text, so a one-value task scores 0 or 1
and a four-value one 0, 1/4, ..., 1. A cell (cache, task, length) reports the mean score with a 95% confidence
interval: the Wilson score interval when every score is 0 or 1, else the normal approximation mean +- 1.96 s/sqrt(n)
(s the sample standard deviation), clipped to [0, 1], the whole [0, 1] for a single fractional score
(`score_interval`).

The model is run as `kvpack passkey` runs it: all but the last prompt token once, into a full-precision cache whose
keys/values are handed to each cache under test (`passkey.prefill`, `passkey.filled_cache`: what that cache's own
prefill would store), then the last prompt token and the answer attend to the cache under test: through kvpack's fused
attention when the model runs it (`kvpack ruler` loads it so, as `kvpack generate` does), else dequantized into the
model's own attention; the result records which (`attention`). Results: a
JSON-ready dict (`run_ruler`), a Markdown page (`to_markdown`) and accuracy-vs-length plots (`plot_accuracy`), both
made from the JSON form.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kvpack.cache.plan import context_limit
from kvpack.errors import ConfigError
from kvpack.eval.passkey import (
    FILLER_SENTENCES,
    context_notes,
    encode,
    filled_cache,
    filler_tokens,
    fit_lengths,
    generate_answer,
    most_filler,
    nearest_boundaries,
    parse_caches,
    prefill,
    sentence_tokens,
)
from kvpack.harness.caches import resolve_auto
from kvpack.harness.results import markdown_page, markdown_table, parse_list, provenance, timed

NIAH_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the numbers afterwards.\n{context}\nWhat are all the special magic numbers for {query} mentioned in the "
    "provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic numbers for {query} mentioned in the provided text are"
# RULER's wording when one value is asked for (its template with "Some" -> "A", "are all"/"are" -> "is", singular).
NIAH_TEMPLATE_ONE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
    "the number afterwards.\n{context}\nWhat is the special magic number for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX_ONE = " The special magic number for {query} mentioned in the provided text is"
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {count} variables are assigned "
    "the value {query}, they are:"
)

# Adjective-noun keys ("dull-river"): RULER's kind of key, from short common words.
ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crisp", "curious", "dark", "dull",
    "eager", "early", "empty", "fancy", "fierce", "gentle", "giant", "golden", "grumpy", "happy", "hollow", "honest",
    "humble", "icy", "jolly", "kind", "lazy", "little", "lively", "lonely", "loud", "lucky", "merry", "modern",
    "narrow", "noble", "odd", "pale", "plain", "polite", "proud", "quiet", "rapid", "rough", "rusty", "shiny",
    "silent", "silver", "sleepy", "smooth", "solid", "sour", "steady", "strange", "sunny", "swift", "tame", "tiny",
    "vivid", "warm", "wild", "wise",
)  # fmt: skip
NOUNS = (
    "anchor", "apple", "arrow", "badger", "basket", "beacon", "bottle", "bridge", "candle", "canyon", "castle",
    "cherry", "cloud", "comet", "copper", "cottage", "crystal", "desert", "dragon", "drum", "falcon", "feather",
    "forest", "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern",
    "lemon", "meadow", "mirror", "monkey", "needle", "orchard", "otter", "parrot", "pebble", "pepper", "piano",
    "pillow", "planet", "pocket", "rabbit", "river", "saddle", "shadow", "spoon", "storm", "tiger", "tower",
    "trumpet", "tulip", "turtle", "valley", "violin", "wagon", "walnut", "whistle", "window",
)  # fmt: skip
KEYS = tuple(f"{adjective}-{noun}" for adjective in ADJECTIVES for noun in NOUNS)
# The depths a needle may be drawn at: RULER's 40 evenly spaced percentages, as fractions.
DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))
PASSAGE_SENTENCES = len(FILLER_SENTENCES)  # a haystack line is the whole filler passage
VT_EXAMPLE_SENTENCES = 5 * PASSAGE_SENTENCES  # the one-shot example's haystack: five lines (RULER's: ~500 tokens)


@dataclass(frozen=True)
class Task:
    """One RULER task's shape.

    keys: needle keys (niah) or chains (vt). values: values per key (niah) or hops + 1 (vt: variables per chain).
    queries: keys asked for at once. max_new_tokens: the greedy answer's budget.
    """

    name: str
    keys: int
    values: int
    queries: int
    max_new_tokens: int
    description: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("niah_single", 1, 1, 1, 16, "one needle, asked for its 7-digit number"),
        Task("niah_multikey", 4, 1, 1, 16, "four needles with different keys, one asked for"),
        Task("niah_multivalue", 1, 4, 1, 48, "one key with four numbers, all asked for"),
        Task("niah_multiquery", 4, 1, 4, 48, "four needles with different keys, all four asked for"),
        Task("vt", 1, 5, 1, 32, "a chain of five variables holding one number; name them all"),
    )
}
DEFAULT_TASKS = tuple(TASKS)
DEFAULT_CACHES = ("fp", "k8v8", "k4v4", "k2v2")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_SAMPLES = 20
CONFIDENCE = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


@dataclass(frozen=True)
class RulerSample:
    """What one sample asks, before a haystack is laid around it: fixed by (seed, task, length, sample).

    needles: the needle lines, in prompt order. depths: each needle's requested depth in [0, 1], ascending.
    query: what the question names (keys, "a, b, and c"; vt: the number). answers: the values the answer must hold.
    template: the task's text with `{context}` for the haystack. answer_prefix: what the prompt ends with (the start
    of the answer). example: text before the template (vt's one-shot example), else "".
    """

    task: str
    needles: tuple[str, ...]
    depths: tuple[float, ...]
    query: str
    answers: tuple[str, ...]
    template: str
    answer_prefix: str
    example: str = ""


@dataclass(frozen=True)
class RulerPrompt:
    """One RULER prompt, tokenized.

    input_ids: the prompt's token ids (special tokens included), `n_tokens` of them. text: the prompt as text (the
    chat template applied when built with `chat=True`). sample: what it asks. filler_sentences: filler sentences in
    the haystack. needle_tokens: index in `input_ids` of the first token of each needle line, in `sample.needles`
    order. needle_depths: each needle's actual depth, filler tokens before it / all filler tokens.
    """

    input_ids: list[int]
    text: str
    sample: RulerSample
    filler_sentences: int
    needle_tokens: tuple[int, ...]
    needle_depths: tuple[float, ...]

    @property
    def n_tokens(self) -> int:
        """Total prompt tokens."""
        return len(self.input_ids)


def parse_tasks(names: str | Sequence[str]) -> list[str]:
    """Task names, comma-separated or a sequence, each once, in `TASKS` order ("all" is every task). Raises
    ConfigError for an unknown name or none."""
    listed = parse_list(names, "--tasks", choices=[*TASKS, "all"])
    return list(TASKS) if "all" in listed else [name for name in TASKS if name in listed]


def check_settings(tasks: Sequence[str], lengths: Sequence[int], samples: int) -> None:
    """Raise ConfigError unless every task is known, every length positive and `samples` at least 1."""
    parse_tasks(tasks)
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"lengths {list(lengths)}: give positive token counts, e.g. 1024,2048,4096.")
    if samples < 1:
        raise ConfigError(f"samples {samples}: give at least 1 sample per (task, length) cell.")


def _variables(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        if (name := "".join(rng.choices(string.ascii_uppercase, k=letters))) not in names:
            names.append(name)
    return names


def _chain(names: Sequence[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}", *(f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names))]


def make_sample(task: str, seed: int, n_tokens: int, sample: int) -> RulerSample:
    """Sample `sample` of `task` at `n_tokens`: keys, values and needle depths drawn from a `random.Random` seeded by
    (seed, task, length, sample), so every cache (and every run with the same seed) gets the same one. Raises
    ConfigError for an unknown task."""
    if task not in TASKS:
        raise ConfigError(f"task {task!r} unknown; use one or more of {', '.join(TASKS)}.")
    shape = TASKS[task]
    rng = random.Random(f"ruler/{seed}/{task}/{n_tokens}/{sample}")
    if task == "vt":
        value = str(rng.randint(10000, 99999))
        names = _variables(rng, shape.values, 5)
        needles = _chain(names, value)
        depths = tuple(sorted(rng.sample(DEPTHS, len(needles))))  # in chain order: each line after the one it reads
        # RULER's one-shot example: the same task on a short haystack, answered (three-letter variables).
        example_value = value
        while example_value == value:
            example_value = str(rng.randint(10000, 99999))
        example_names = _variables(rng, shape.values, 3)
        example_needles = _chain(example_names, example_value)
        example_depths = sorted(rng.sample(DEPTHS, len(example_needles)))
        boundaries = nearest_boundaries(VT_EXAMPLE_SENTENCES, example_depths)
        context, _ = _haystack(VT_EXAMPLE_SENTENCES, boundaries, example_needles)
        example = (
            VT_TEMPLATE.format(context=context, query=example_value)
            + VT_ANSWER_PREFIX.format(count=len(example_names), query=example_value)
            + " "
            + " ".join(example_names)
            + "\n"
        )
        return RulerSample(
            task, tuple(needles), depths, value, tuple(names), VT_TEMPLATE.replace("{query}", value),
            VT_ANSWER_PREFIX.format(count=len(names), query=value), example,
        )  # fmt: skip
    keys = rng.sample(KEYS, shape.keys)
    numbers: list[str] = []
    while len(numbers) < shape.keys * shape.values:
        if (number := str(rng.randint(1_000_000, 9_999_999))) not in numbers:
            numbers.append(number)
    values = [numbers[i * shape.values : (i + 1) * shape.values] for i in range(shape.keys)]
    needles = [NIAH_NEEDLE.format(key=key, value=v) for key, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    depths = tuple(sorted(rng.sample(DEPTHS, len(needles))))
    asked = rng.sample(range(shape.keys), shape.queries)
    queried = [keys[i] for i in asked]
    query = f"{', '.join(queried[:-1])}, and {queried[-1]}" if len(queried) > 1 else queried[0]
    one = shape.queries * shape.values == 1
    template, prefix = (NIAH_TEMPLATE_ONE, NIAH_ANSWER_PREFIX_ONE) if one else (NIAH_TEMPLATE, NIAH_ANSWER_PREFIX)
    answers = tuple(v for i in asked for v in values[i])
    return RulerSample(task, tuple(needles), depths, query, answers, template.replace("{query}", query),
                       prefix.format(query=query))  # fmt: skip


def _haystack(n_sentences: int, positions: Sequence[int], needles: Sequence[str]) -> tuple[str, list[int]]:
    """The haystack (filler lines of one passage each, each needle on its own line before sentence `positions[i]`)
    and each needle's character offset in it."""
    lines: list[str] = []
    line: list[str] = []
    needle_lines: list[int] = []
    pending = list(zip(positions, needles, strict=True))
    for i in range(n_sentences + 1):
        while pending and pending[0][0] == i:
            if line:
                lines.append(" ".join(line))
                line = []
            needle_lines.append(len(lines))
            lines.append(pending.pop(0)[1])
        if i < n_sentences:
            line.append(FILLER_SENTENCES[i % PASSAGE_SENTENCES])
            if i % PASSAGE_SENTENCES == PASSAGE_SENTENCES - 1:
                lines.append(" ".join(line))
                line = []
    if line:
        lines.append(" ".join(line))
    starts = [0, *itertools.accumulate(len(text) + 1 for text in lines)]
    return "\n".join(lines), [starts[k] for k in needle_lines]


def _render(
    tokenizer: Any, sample: RulerSample, n_sentences: int, chat: bool, counts: Sequence[int]
) -> tuple[str, list[int]]:
    """(prompt text, character offset of each needle) with `n_sentences` of filler."""
    context, offsets = _haystack(n_sentences, nearest_boundaries(n_sentences, sample.depths, counts), sample.needles)
    body = sample.example + sample.template.format(context=context)
    start = len(sample.example) + sample.template.index("{context}")
    if chat:
        messages = [{"role": "user", "content": body}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = head + sample.answer_prefix.lstrip()
        start += head.index(body)
    else:
        text = body + sample.answer_prefix
    return text, [start + offset for offset in offsets]


def fixed_tokens(tokenizer: Any, sample: RulerSample, chat: bool = False) -> int:
    """Tokens of `sample`'s prompt without any filler: the shortest length it can be built to."""
    return len(encode(tokenizer, _render(tokenizer, sample, 0, chat, (1,))[0], chat)[0])


def build_prompt(tokenizer: Any, sample: RulerSample, n_tokens: int, chat: bool = False) -> RulerPrompt:
    """`sample`'s prompt with the most filler sentences that keep it at most `n_tokens` tokens (template, needles,
    question and answer prefix included).

    tokenizer: a fast Hugging Face tokenizer (offsets locate the needles), with a chat template when `chat`.
    Raises ConfigError when `n_tokens` cannot hold the prompt without filler.
    """
    counts = sentence_tokens(tokenizer)
    render = partial(_render, tokenizer, sample, chat=chat, counts=counts)
    advice = f": use longer --lengths or leave {sample.task} out of --tasks"
    sentences = most_filler(tokenizer, render, n_tokens, chat, f"a {sample.task} prompt", advice)
    text, needle_at = render(sentences)
    ids, offsets = encode(tokenizer, text, chat)
    needle_tokens = tuple(next(i for i, (_, end) in enumerate(offsets) if end > at) for at in needle_at)
    cumulative = filler_tokens(counts, sentences)
    depths = tuple(
        cumulative[k] / cumulative[-1] if sentences else 0.0
        for k in nearest_boundaries(sentences, sample.depths, counts)
    )
    return RulerPrompt(ids, text, sample, sentences, needle_tokens, depths)


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """RULER's score of one answer: the fraction of `answers` found in `output` (case-insensitive substrings)."""
    text = output.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def wilson_interval(successes: int, n: int, z: float = _Z) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion `successes / n` (95% with the default `z`)."""
    if n < 1:
        return (0.0, 1.0)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def score_interval(scores: Sequence[float], z: float = _Z) -> tuple[float, float, str]:
    """(low, high, method) of a 95% confidence interval for the mean of `scores` (each in [0, 1]).

    "wilson" when every score is 0 or 1 (a proportion); else "normal": mean +- z s/sqrt(n) with s the sample
    standard deviation, clipped to [0, 1] (the whole [0, 1] for a single score: no spread to estimate).
    """
    n = len(scores)
    if all(s in (0.0, 1.0) for s in scores):
        return (*wilson_interval(round(sum(scores)), n, z), "wilson")
    if n < 2:
        return (0.0, 1.0, "normal")
    mean = sum(scores) / n
    half = z * math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)
    return (max(0.0, mean - half), min(1.0, mean + half), "normal")


def summarize(scores: Sequence[float]) -> dict[str, Any]:
    """A cell's JSON form: n, mean, the 95% interval's ends (`low`, `high`) and how it was made (`interval`)."""
    low, high, method = score_interval(scores)
    mean = sum(scores) / len(scores) if scores else float("nan")
    return {"n": len(scores), "mean": round(mean, 4), "low": round(low, 4), "high": round(high, 4), "interval": method}


def check_lengths(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int,
                  chat: bool = False) -> None:  # fmt: skip
    """Raise ConfigError, naming the shortest length that works, when some (task, length, sample) prompt cannot be
    built: the length cannot hold its template, needles and question."""
    for task in tasks:
        for n_tokens in lengths:
            needed = max(fixed_tokens(tokenizer, make_sample(task, seed, n_tokens, s), chat) for s in range(samples))
            if needed > n_tokens:
                raise ConfigError(
                    f"--lengths {n_tokens} is too short for {task}: its prompts need at least {needed} tokens "
                    f"(instructions, needles, question) before any filler; use lengths of at least {needed} or "
                    f"leave {task} out of --tasks."
                )


def run_ruler(
    model: Any,
    tokenizer: Any,
    *,
    caches: str | Sequence[str] = DEFAULT_CACHES,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    chat: bool = False,
    model_name: str | None = None,
    command: str | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Score each cache on each task at each length; the JSON-ready result.

    Every (task, length, sample) prompt is asked of every cache in turn, its prefill run once and handed to each
    (see `passkey.filled_cache`). model: with kvpack's attention (`kvpack.harness.caches.prepare_timed_model`),
    kvpack caches decode through their fused kernel; else their `update` hands the model dequantized tensors.

    Lengths are total prompt tokens; one beyond the model's context raises ConfigError before anything runs
    (`passkey.fit_lengths`, with room for the longest answer), as do unknown tasks or caches and lengths too short
    for a task (`check_lengths`). command: what the result records (default the running command line). The result
    holds the run's settings, machine and versions, `cells[cache][task][length]` (string lengths: {"n", "mean",
    "low", "high", "interval"}), `mean_over_tasks[cache][length]`, and one record per generation in `runs`
    (prompt, needle positions, expected values, output text, score, timings).

    checkpoint: a JSON Lines file that each finished (cache, task, length, sample) is appended to as it finishes; a
    later run given the same file asks only what it does not hold yet (a run cut off, more samples, lengths or
    caches), so a long run can be spread over several sessions. Its first line records what the answers depend on
    (`checkpoint_settings`); a run with other settings is refused (ConfigError) before anything runs. The result
    counts the runs taken from it (`resumed_runs`).
    """
    from tqdm import tqdm

    specs = parse_caches(caches)
    names = parse_tasks(tasks)
    check_settings(names, lengths, samples)
    requested = sorted(set(lengths))
    context = context_limit(model.config)
    new_tokens = max(TASKS[name].max_new_tokens for name in names)
    lengths = fit_lengths(requested, context, new_tokens)
    check_lengths(tokenizer, names, lengths, samples, seed, chat)
    resolve_auto(specs.values(), model, tokenizer)
    notes = context_notes(requested, context, new_tokens)
    label = model_name or getattr(model.config, "name_or_path", None)
    attention = getattr(model.config, "_attn_implementation", None)
    done = _open_checkpoint(checkpoint, checkpoint_settings(label, seed, chat, attention, names))

    # Longest prompts first: a memory problem shows at once, and the ETA errs long rather than short.
    cells = [(n, task, s) for n in reversed(lengths) for task in names for s in range(samples)]
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tqdm(total=len(cells), unit="sample", desc="ruler", disable=not progress, file=sys.stderr) as bar:
        for n_tokens, task, index in cells:
            bar.set_postfix_str(f"{n_tokens} tokens, {task}, sample {index + 1}/{samples}")
            missing = [cache for cache in specs if (cache, task, n_tokens, index) not in done]
            if missing:  # the prompt and its shared prefill only where some cache still has to answer it
                prompt = build_prompt(tokenizer, make_sample(task, seed, n_tokens, index), n_tokens, chat=chat)
                prefilled, prefill_s = timed(prefill, model, prompt)
            for cache_name, spec in specs.items():
                if cache_name not in missing:
                    runs.append(done[cache_name, task, n_tokens, index])
                    continue
                generate_start = time.perf_counter()
                cache = filled_cache(spec, model.config, prefilled)
                output = generate_answer(model, tokenizer, prompt, cache, TASKS[task].max_new_tokens)
                runs.append({
                    "cache": cache_name, "task": task, "length": n_tokens, "sample": index,
                    "prompt_tokens": prompt.n_tokens, "filler_sentences": prompt.filler_sentences,
                    "needle_tokens": list(prompt.needle_tokens),
                    "needle_depths": [round(d, 4) for d in prompt.needle_depths],
                    "query": prompt.sample.query, "answers": list(prompt.sample.answers), "output": output,
                    "score": string_match_all(output, prompt.sample.answers),
                    "shared_prefill_s": round(prefill_s, 3) if prefilled is not None else None,
                    "generate_s": round(time.perf_counter() - generate_start, 3),
                })  # fmt: skip
                if checkpoint is not None:
                    with open(checkpoint, "a", encoding="utf-8") as file:
                        file.write(json.dumps(runs[-1]) + "\n")
            bar.update()

    def scores(name: str, task: str, n_tokens: int) -> list[float]:
        return [r["score"] for r in runs if (r["cache"], r["task"], r["length"]) == (name, task, n_tokens)]

    summary = {
        name: {task: {str(n): summarize(scores(name, task, n)) for n in lengths} for task in names} for name in specs
    }
    mean_over_tasks = {
        name: {str(n): round(sum(summary[name][t][str(n)]["mean"] for t in names) / len(names), 4) for n in lengths}
        for name in specs
    }
    return {
        **provenance("ruler", model, label, command=command),
        "prompt": "chat" if chat else "raw",
        "attention": attention,
        "tasks": names,
        "task_settings": {
            name: {"max_new_tokens": TASKS[name].max_new_tokens, "description": TASKS[name].description}
            for name in names
        },
        "max_context": context,
        "requested_lengths": requested,
        "lengths": lengths,
        "samples": samples,
        "seed": seed,
        "caches": list(specs),
        "confidence": CONFIDENCE,
        "shared_prefill": any(r["shared_prefill_s"] is not None for r in runs),
        "notes": notes,
        "cells": summary,
        "mean_over_tasks": mean_over_tasks,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "compute_s": round(_compute_seconds(runs), 1),
        **({"checkpoint": str(checkpoint)} if checkpoint is not None else {}),
        "resumed_runs": sum((r["cache"], r["task"], r["length"], r["sample"]) in done for r in runs),
        "runs": runs,
    }


def _compute_seconds(runs: Sequence[dict[str, Any]]) -> float:
    """The model time of `runs`: each shared prefill once, and every answer."""
    prefills = {(r["task"], r["length"], r["sample"]): r["shared_prefill_s"] or 0.0 for r in runs}
    return sum(prefills.values()) + sum(r["generate_s"] for r in runs)


def checkpoint_settings(
    model_name: str | None, seed: int, chat: bool, attention: str | None, tasks: Sequence[str]
) -> dict[str, Any]:
    """What a checkpoint's answers depend on besides (cache, task, length, sample): the first line of its file."""
    from kvpack.version import __version__

    return {
        "ruler_checkpoint": 1, "kvpack": __version__, "model": model_name, "seed": seed, "chat": chat,
        "attention": attention, "max_new_tokens": {task: TASKS[task].max_new_tokens for task in tasks},
    }  # fmt: skip


def _open_checkpoint(path: str | Path | None, settings: dict[str, Any]) -> dict[tuple[str, str, int, int], Any]:
    """The runs a checkpoint file holds, by (cache, task, length, sample); a new file gets `settings` as its first
    line. A last line cut off mid-write is dropped (and cut from the file); other settings raise ConfigError."""
    if path is None:
        return {}
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text and not text.endswith("\n"):  # a run stopped while writing: keep the whole lines
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    if not text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings) + "\n", encoding="utf-8")
        return {}
    lines = text.splitlines()
    try:
        recorded = json.loads(lines[0])
        runs = [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not a ruler checkpoint (JSON Lines): {exc}") from exc
    if not isinstance(recorded, dict) or "ruler_checkpoint" not in recorded:
        raise ConfigError(f"{path} is not a ruler checkpoint: its first line records no settings.")
    mine = {**settings, "max_new_tokens": {**recorded.get("max_new_tokens", {}), **settings["max_new_tokens"]}}
    differ = sorted(key for key in set(recorded) | set(mine) if recorded.get(key) != mine.get(key))
    if differ:
        changes = "; ".join(f"{key}: {recorded.get(key)!r} there, {mine.get(key)!r} here" for key in differ)
        raise ConfigError(f"{path} was made with other settings ({changes}); use another checkpoint file.")
    return {(r["cache"], r["task"], r["length"], r["sample"]): r for r in runs}


def _cell_text(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.0%} ({cell['low']:.0%}-{cell['high']:.0%})"


def to_markdown(result: dict[str, Any]) -> str:
    """A Markdown report of a `run_ruler` result: the mean over tasks per cache and length, then one row per task x
    cache with each length's mean score and 95% interval."""
    tasks, lengths, caches, cells = result["tasks"], result["lengths"], result["caches"], result["cells"]
    intro = (
        f"RULER's synthetic tasks ({', '.join(tasks)}), generated with seeded keys and values ({result['prompt']} "
        f"prompt, {result['dtype']}); length = total prompt tokens. Greedy decoding; a sample scores the fraction of "
        "its expected values found in the answer (RULER's string match). Each cell: mean score over "
        f"{result['samples']} samples (seed {result['seed']}; the same prompts for every cache) with a 95% interval "
        "(Wilson when every score is 0 or 1, else normal). "
        f"Run time {result['elapsed_s'] / 60:.1f} min."
    )
    if result.get("resumed_runs"):
        intro += (
            f" Of its {len(result['runs'])} answers, {result['resumed_runs']} were taken from the checkpoint file of "
            "earlier runs with the same settings (the run time counts the last run only; the model's time over "
            f"every prefill and answer: {result['compute_s'] / 60:.1f} min)."
        )
    if result.get("shared_prefill"):
        intro += (
            " Each prompt but its last token is run through the model once, in full precision, and handed to every "
            "cache: what that cache's own prefill stores (a kvpack prefill attends to itself exactly); the last "
            "prompt token and the answer attend to the cache under test"
        )
        intro += (
            ", kvpack caches through kvpack's fused attention."
            if result.get("attention") == "kvpack"
            else f", kvpack caches dequantized into the model's {result.get('attention') or 'own'} attention."
        )
    lines = [intro]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}."]
    settings = [
        [task, result["task_settings"][task]["description"], result["task_settings"][task]["max_new_tokens"]]
        for task in tasks
    ]
    lines += ["", *markdown_table(["task", "what it asks", "max new tokens"], settings, "llr")]
    means = result["mean_over_tasks"]
    rows = [[name, *(f"{means[name][str(n)]:.0%}" for n in lengths)] for name in caches]
    lines += ["", "Mean score over tasks:", ""]
    lines += markdown_table(["cache", *(f"{n} tokens" for n in lengths)], rows, "l" + "r" * len(lengths))
    rows = [
        [task, name, *(_cell_text(cells[name][task][str(n)]) for n in lengths)] for task in tasks for name in caches
    ]
    lines += ["", "Mean score (95% interval) per task:", ""]
    lines += markdown_table(["task", "cache", *(f"{n} tokens" for n in lengths)], rows, "ll" + "r" * len(lengths))
    fp = cells.get("fp")
    weak = [task for task in tasks if fp and all(fp[task][str(n)]["mean"] < 0.5 for n in lengths)]
    if weak:
        lines += [
            "",
            f"The full-precision cache itself scores under 50% on {', '.join(weak)} at every length: there the limit "
            "is the model's, not the quantized caches'.",
        ]
    return markdown_page(f"RULER: {result['model']}, {result['date'][:10]}", result, [], lines)


def plot_accuracy(result: dict[str, Any], path: str | Path) -> None:
    """Write a PNG of a `run_ruler` result: one panel per task and one for the mean over tasks, x = prompt tokens
    (log scale), y = mean score, one line per cache (with its 95% interval shaded on the task panels)."""
    # matplotlib is imported here only: importing kvpack must stay light. Figure (no pyplot) needs no backend state.
    from matplotlib.figure import Figure

    tasks, lengths, caches = result["tasks"], result["lengths"], result["caches"]
    panels = [*tasks, "mean over tasks"] if len(tasks) > 1 else list(tasks)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for name in caches:
            if panel in tasks:
                cells = [result["cells"][name][panel][str(n)] for n in lengths]
                means = [c["mean"] for c in cells]
                ax.fill_between(lengths, [c["low"] for c in cells], [c["high"] for c in cells], alpha=0.12)
            else:
                means = [result["mean_over_tasks"][name][str(n)] for n in lengths]
            ax.plot(lengths, means, marker="o", label=name)
        ax.set_title(panel, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("mean score")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"RULER tasks, {result['model']} ({result['samples']} samples per cell, 95% intervals)", fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
