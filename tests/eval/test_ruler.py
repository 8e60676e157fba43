"""`kvpack ruler`: seeded samples, prompt construction, RULER's scoring, the confidence intervals, the run, the writers
and the CLI.

Prompts are built with the embedded default model's real tokenizer (read from its GGUF once per process); runs use a
tiny random-weight Llama with that tokenizer's vocabulary, so they are fast and never answer on purpose.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpack import cli
from kvpack.cache import KVPackCache
from kvpack.errors import ConfigError, KVPackError
from kvpack.eval import ruler
from kvpack.eval.passkey import FILLER, FILLER_SENTENCES
from kvpack.eval.ruler import (
    KEYS,
    TASKS,
    build_prompt,
    fixed_tokens,
    make_sample,
    parse_tasks,
    plot_accuracy,
    run_ruler,
    score_interval,
    string_match_all,
    to_markdown,
    wilson_interval,
)
from kvpack.harness.results import publish
from tests.helpers.models import default_tokenizer, tiny_llama

# A filler sentence is 4-6 tokens with this tokenizer: a prompt built to N tokens is at most N and fewer than one
# sentence (plus a token or two the line breaks can merge or add) short of it.
LENGTH_SLACK = 8
TINY_CONTEXT = 1024
TINY_CACHES = ["fp", "k4v4-plain-r32"]  # residual 32: the tiny prompts below are mostly packed

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return default_tokenizer()


def _tiny(tokenizer: Any) -> Any:
    """A tiny random-weight Llama with the tokenizer's vocabulary (head_dim 64: kvpack's default group)."""
    return tiny_llama(
        vocab_size=len(tokenizer), hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=TINY_CONTEXT, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tokenizer: Any, device: torch.device) -> Any:
    return _tiny(tokenizer).to(device)


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- samples ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_seeded(task: str) -> None:
    first = [make_sample(task, 0, 1024, s) for s in range(10)]
    assert first == [make_sample(task, 0, 1024, s) for s in range(10)]  # same seed: the same prompts
    assert len({s.answers for s in first}) == len(first)  # each sample its own values
    assert len({(s.needles, s.depths) for s in first}) == len(first)
    assert make_sample(task, 1, 1024, 0).answers != first[0].answers
    assert make_sample(task, 0, 2048, 0).answers != first[0].answers
    assert all(list(s.depths) == sorted(s.depths) and len(set(s.depths)) == len(s.depths) for s in first)
    assert all(0.0 <= d <= 1.0 for s in first for d in s.depths)


@pytest.mark.parametrize(
    ("task", "needles", "answers"),
    [("niah_single", 1, 1), ("niah_multikey", 4, 1), ("niah_multivalue", 4, 4), ("niah_multiquery", 4, 4)],
)
def test_niah_samples_hold_their_needles(task: str, needles: int, answers: int) -> None:
    for index in range(5):
        sample = make_sample(task, 0, 4096, index)
        assert len(sample.needles) == needles and len(sample.answers) == answers
        found = [re.fullmatch(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", n) for n in
                 sample.needles]  # fmt: skip
        assert all(found)
        pairs = [(m.group(1), m.group(2)) for m in found if m]
        keys, values = {k for k, _ in pairs}, [v for _, v in pairs]
        assert keys <= set(KEYS) and len(set(values)) == len(values) and all(v[0] != "0" for v in values)
        assert len(keys) == (1 if task == "niah_multivalue" else needles)
        asked = sample.query.replace(", and ", ", ").split(", ")
        assert set(asked) <= keys and len(asked) == (4 if task == "niah_multiquery" else 1)
        # The answers are exactly the asked keys' values (in the order asked).
        assert set(sample.answers) == {v for k, v in pairs if k in asked}
        if task == "niah_multiquery":
            assert list(sample.answers) == [v for key in asked for k, v in pairs if k == key]
        single = answers == 1
        assert sample.template.startswith("A special magic number is" if single else "Some special magic numbers are")
        assert sample.answer_prefix == (
            f" The special magic number{'' if single else 's'} for {sample.query} mentioned in the provided text "
            f"{'is' if single else 'are'}"
        )
        assert sample.example == ""


def test_variable_tracking_sample_is_one_chain() -> None:
    sample = make_sample("vt", 0, 4096, 3)
    names, value = sample.answers, sample.query
    assert len(names) == 5 and len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert re.fullmatch(r"[1-9]\d{4}", value)
    assert sample.needles == (
        f"VAR {names[0]} = {value}",
        *(f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)),
    )
    assert sample.answer_prefix.endswith(f"5 variables are assigned the value {value}, they are:")
    # RULER's one-shot example: the same task, answered, before the question.
    example = sample.example
    assert example.startswith("Memorize and track") and example.endswith("\n")
    shown = example.rstrip("\n").rsplit("they are: ", 1)[1].split()
    assert len(shown) == 5 and all(re.fullmatch(r"[A-Z]{3}", n) for n in shown)
    assert example.count("VAR ") == 1 + 2 * 4 and value not in example


# -- prompts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("n_tokens", [700, 4096])
def test_prompt_has_the_target_length(tokenizer: Any, task: str, n_tokens: int) -> None:
    sample = make_sample(task, 0, n_tokens, 0)
    prompt = build_prompt(tokenizer, sample, n_tokens)
    assert 0 <= n_tokens - prompt.n_tokens < LENGTH_SLACK, (n_tokens, prompt.n_tokens)
    # The ids are the text's own tokenization: what the model sees is what was measured.
    assert prompt.input_ids == tokenizer(prompt.text)["input_ids"]
    assert prompt.text.endswith(sample.answer_prefix)
    assert prompt.text.startswith(sample.example)
    assert prompt.filler_sentences > 0


@pytest.mark.parametrize("task", ["niah_single", "vt"])
def test_chat_prompt_ends_with_the_answer_prefix(tokenizer: Any, task: str) -> None:
    sample = make_sample(task, 0, 1024, 0)
    prompt = build_prompt(tokenizer, sample, 1024, chat=True)
    assert 0 <= 1024 - prompt.n_tokens < LENGTH_SLACK
    assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert prompt.text.startswith("<|im_start|>") and prompt.text.endswith("<|im_start|>assistant\n" +
                                                                          sample.answer_prefix.lstrip())  # fmt: skip
    assert all(prompt.text.count(needle) == 1 for needle in sample.needles)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("index", [0, 1])
def test_needles_sit_at_their_depths(tokenizer: Any, task: str, index: int) -> None:
    sample = make_sample(task, 0, 2048, index)
    prompt = build_prompt(tokenizer, sample, 2048)
    text = prompt.text
    encoded = tokenizer(text, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    # The haystack: from after the template's first line to the question; filler tokens counted from the text.
    start = len(sample.example) + sample.template.index("{context}")
    end = text.rindex("What" if task != "vt" else "Question:")
    needle_at = [text.index(needle, start) for needle in sample.needles]
    assert needle_at == sorted(needle_at) and all(text.count(needle) == 1 for needle in sample.needles)
    spans = [(at, at + len(needle)) for at, needle in zip(needle_at, sample.needles, strict=True)]

    def filler_tokens(until: int) -> int:
        return sum(
            1 for a, b in offsets
            if start <= a and b <= until and text[a:b].strip() and not any(s <= a < e for s, e in spans)
        )  # fmt: skip

    total = filler_tokens(end)
    sentence = 6 / total  # one filler sentence, as a fraction of the haystack
    for i, (at, needle) in enumerate(zip(needle_at, sample.needles, strict=True)):
        measured = filler_tokens(at) / total
        assert abs(measured - sample.depths[i]) <= sentence, (i, measured, sample.depths[i])
        assert abs(prompt.needle_depths[i] - measured) < 0.01
        # On its own line, and its first token is the one recorded.
        assert text[at - 1] == "\n" and text[at + len(needle)] == "\n"
        first, after = offsets[prompt.needle_tokens[i]]
        assert first <= at < after
    # The filler is the passkey passage, one per line (lines broken only where a needle sits).
    lines = [line for line in text[start:end].split("\n") if line and line not in sample.needles]
    assert all(line in FILLER for line in lines) and lines.count(FILLER) >= len(lines) - 2 * len(sample.needles) - 1
    sentences = [s.strip() for line in lines for s in re.findall(r"[^.]+\.", line)]
    assert set(sentences) <= set(FILLER_SENTENCES) and len(sentences) == prompt.filler_sentences


def test_values_appear_only_in_their_needles(tokenizer: Any) -> None:
    for task in ("niah_multikey", "niah_multivalue", "niah_multiquery"):
        sample = make_sample(task, 0, 1024, 2)
        prompt = build_prompt(tokenizer, sample, 1024)
        assert len(re.findall(r"\d{7}", prompt.text)) == len(sample.needles)
        assert all(prompt.text.count(answer) == 1 for answer in sample.answers)


def test_answer_budget_holds_the_full_answer(tokenizer: Any) -> None:
    for task, shape in TASKS.items():
        for index in range(5):
            answers = make_sample(task, 0, 1024, index).answers
            listed = f"{', '.join(answers[:-1])}, and {answers[-1]}" if len(answers) > 1 else answers[0]
            for answer in (f" {listed}.", " " + " ".join(answers), " " + ", ".join(answers) + "."):
                assert _tokens(tokenizer, answer) <= shape.max_new_tokens - 4, (task, answer)


def test_too_short_or_unknown_is_a_clear_error(tokenizer: Any) -> None:
    sample = make_sample("vt", 0, 100, 0)
    needed = fixed_tokens(tokenizer, sample)
    assert 300 < needed < 600
    with pytest.raises(ConfigError, match=f"needs at least {needed} tokens.*leave vt out of --tasks"):
        build_prompt(tokenizer, sample, 100)
    assert build_prompt(tokenizer, sample, needed).filler_sentences == 0
    with pytest.raises(ConfigError, match="unknown; use one or more of niah_single"):
        make_sample("niah_double", 0, 1024, 0)
    with pytest.raises(ConfigError, match="--tasks 'vt,qa': qa unknown"):
        parse_tasks("vt,qa")
    with pytest.raises(ConfigError, match="too short for vt: its prompts need at least"):
        ruler.check_lengths(tokenizer, ["niah_single", "vt"], [200], 2, 0)
    ruler.check_lengths(tokenizer, ["niah_single"], [200], 2, 0)
    with pytest.raises(ConfigError, match="samples 0"):
        ruler.check_settings(["vt"], [1024], 0)
    with pytest.raises(ConfigError, match="positive token counts"):
        ruler.check_settings(["vt"], [0], 1)


def test_task_names_keep_their_order_and_all_means_every_task() -> None:
    assert parse_tasks("vt, niah_single,vt") == ["niah_single", "vt"]
    assert parse_tasks("all") == list(TASKS) == parse_tasks(list(ruler.DEFAULT_TASKS))


# -- scoring ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "answers", "score"),
    [
        (" 1234567.", ["1234567"], 1.0),
        (" 1234568.", ["1234567"], 0.0),
        ("", ["1234567"], 0.0),
        (" 12345678", ["1234567"], 1.0),  # RULER's match is a substring: a longer number holds the value
        (" 1234567, 2345678 and 3456789", ["1234567", "2345678", "3456789", "4567890"], 0.75),
        (" 4567890\n1234567", ["1234567", "2345678", "3456789", "4567890"], 0.5),  # any order, any separator
        (" abcde FGHIJ, klmno", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"], 0.6),  # case-insensitive
        (" ABCDE ABCDE ABCDE", ["ABCDE", "FGHIJ"], 0.5),  # a value repeated counts once
    ],
)
def test_string_match_all(output: str, answers: list[str], score: float) -> None:
    assert string_match_all(output, answers) == score


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (10, 20, 0.29929, 0.70071),
        (0, 20, 0.0, 0.16113),  # z^2 / (n + z^2)
        (20, 20, 0.83887, 1.0),
        (1, 10, 0.01788, 0.40415),
        (0, 1, 0.0, 0.79346),
    ],
)
def test_wilson_interval_known_values(successes: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_score_interval_is_wilson_for_binary_scores_and_normal_for_fractions() -> None:
    assert score_interval([1.0, 0.0] * 10) == (*wilson_interval(10, 20), "wilson")
    assert score_interval([1.0] * 3) == (*wilson_interval(3, 3), "wilson")
    # mean 0.625, sample sd sqrt(0.3125 / 3): half-width 1.96 * 0.32275 / 2
    low, high, method = score_interval([0.5, 0.75, 1.0, 0.25])
    assert method == "normal" and (low, high) == pytest.approx((0.30871, 0.94129), abs=5e-5)
    assert score_interval([0.25, 1.0, 1.0, 1.0])[1] == 1.0  # clipped
    assert score_interval([0.5]) == (0.0, 1.0, "normal")
    assert ruler.summarize([1.0, 0.0, 1.0, 1.0]) == {
        "n": 4, "mean": 0.75, "low": 0.3006, "high": 0.9544, "interval": "wilson",
    }  # fmt: skip


# -- the run ------------------------------------------------------------------------------------------------

TINY_LENGTHS = [500, 700]  # vt's prompts need over 400 tokens


@pytest.fixture(scope="module")
def tiny_result(tiny_model: Any, tokenizer: Any) -> dict[str, Any]:
    return run_ruler(
        tiny_model,
        tokenizer,
        caches=TINY_CACHES,
        tasks=["niah_single", "niah_multivalue", "vt"],
        lengths=[*TINY_LENGTHS, TINY_CONTEXT],  # the last one is capped to leave room for the longest answer
        samples=1,
        model_name="tiny-llama",
        command="test",
        progress=False,
    )


def test_result_holds_every_cell_and_run(tiny_result: dict[str, Any]) -> None:
    capped = TINY_CONTEXT - TASKS["niah_multivalue"].max_new_tokens
    lengths = [*TINY_LENGTHS, capped]
    assert tiny_result["lengths"] == lengths and tiny_result["requested_lengths"] == [*TINY_LENGTHS, TINY_CONTEXT]
    assert tiny_result["tasks"] == ["niah_single", "niah_multivalue", "vt"]
    assert tiny_result["caches"] == ["fp", "k4v4-plain-g64-r32"] and tiny_result["shared_prefill"] is True
    assert tiny_result["notes"] and "maximum context" in tiny_result["notes"][0]
    for key in ("command", "date", "machine", "versions", "model", "samples", "seed", "confidence", "task_settings"):
        assert key in tiny_result
    assert tiny_result["task_settings"]["vt"]["max_new_tokens"] == TASKS["vt"].max_new_tokens
    runs = tiny_result["runs"]
    assert len(runs) == 2 * 3 * 3
    assert [(r["length"], r["task"]) for r in runs[::2]] == [(n, t) for n in reversed(lengths) for t in
                                                              tiny_result["tasks"]]  # fmt: skip
    for run in runs:
        assert run["length"] - LENGTH_SLACK < run["prompt_tokens"] <= run["length"]
        assert run["score"] == string_match_all(run["output"], run["answers"])
        assert len(run["needle_tokens"]) == len(run["needle_depths"]) == {"niah_single": 1, "vt": 5}.get(run["task"], 4)
        assert run["shared_prefill_s"] is not None and run["generate_s"] > 0
    # Every cache is asked the same prompts.
    asked = [[(r["task"], r["length"], r["answers"]) for r in runs if r["cache"] == name] for name in TINY_CACHES]
    assert asked[0] == [(r["task"], r["length"], r["answers"]) for r in runs if r["cache"] == "k4v4-plain-g64-r32"]
    for name in tiny_result["caches"]:
        assert list(tiny_result["cells"][name]) == tiny_result["tasks"]
        for task in tiny_result["tasks"]:
            assert list(tiny_result["cells"][name][task]) == [str(n) for n in lengths]
            for n in lengths:
                cell = tiny_result["cells"][name][task][str(n)]
                score = next(r["score"] for r in runs if (r["cache"], r["task"], r["length"]) == (name, task, n))
                assert cell["n"] == 1 and cell["mean"] == score and cell["low"] <= score <= cell["high"]
        for n in lengths:
            means = [tiny_result["cells"][name][t][str(n)]["mean"] for t in tiny_result["tasks"]]
            assert tiny_result["mean_over_tasks"][name][str(n)] == pytest.approx(sum(means) / 3, abs=1e-4)
    json.dumps(tiny_result, allow_nan=False)


def test_run_refuses_lengths_beyond_the_context_or_too_short(tiny_model: Any, tokenizer: Any) -> None:
    with pytest.raises(KVPackError, match=f"maximum context of {TINY_CONTEXT}"):
        run_ruler(tiny_model, tokenizer, caches=["fp"], tasks="vt", lengths=[512, 2048], samples=1, progress=False)
    with pytest.raises(KVPackError, match="too short for vt"):
        run_ruler(tiny_model, tokenizer, caches=["fp"], tasks="all", lengths=[256], samples=1, progress=False)


def test_cells_are_mean_scores_with_intervals(tiny_model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers scripted per cache: fp finds every value, k4v4-plain only the first of each sample's values."""

    def answer(model: Any, tokenizer: Any, prompt: ruler.RulerPrompt, cache: Any, max_new_tokens: int) -> str:
        assert max_new_tokens == TASKS[prompt.sample.task].max_new_tokens
        found = prompt.sample.answers[:1] if isinstance(cache, KVPackCache) else prompt.sample.answers
        return " " + ", ".join(found) + "."

    monkeypatch.setattr(ruler, "generate_answer", answer)
    result = run_ruler(tiny_model, tokenizer, caches=TINY_CACHES, tasks="niah_single,niah_multiquery",
                       lengths=[256], samples=4, progress=False)  # fmt: skip
    fp, packed = result["cells"]["fp"], result["cells"]["k4v4-plain-g64-r32"]
    assert fp["niah_single"]["256"] == packed["niah_single"]["256"] == ruler.summarize([1.0] * 4)
    # Four scores of 1/4: fractional, so the normal interval, of no width (no spread).
    assert packed["niah_multiquery"]["256"] == {"n": 4, "mean": 0.25, "low": 0.25, "high": 0.25, "interval": "normal"}
    assert result["mean_over_tasks"] == {"fp": {"256": 1.0}, "k4v4-plain-g64-r32": {"256": 0.625}}
    markdown = to_markdown(result)
    assert "| fp | 100% |" in markdown and "| k4v4-plain-g64-r32 | 62% |" in markdown
    assert "| niah_single | fp | 100% (51%-100%) |" in markdown
    assert "| niah_multiquery | k4v4-plain-g64-r32 | 25% (25%-25%) |" in markdown


def test_writers_produce_json_markdown_and_png(tiny_result: dict[str, Any], tmp_path: Path) -> None:
    paths = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "plots" / "r.png"
    publish(tiny_result, paths[0], to_markdown, plot_accuracy, markdown_path=paths[1], png_path=paths[2])
    assert json.loads(paths[0].read_text())["cells"] == tiny_result["cells"]
    markdown = paths[1].read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert "| task | cache | 500 tokens | 700 tokens | 976 tokens |" in table
    assert "| fp | " in markdown and "`test`" in markdown and "Note:" in markdown
    assert "dequantized into the model's" in markdown  # the fixture's model runs its own attention
    assert "run through the model once" in markdown and "The full-precision cache itself scores under 50%" in markdown
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_importing_ruler_does_not_import_matplotlib() -> None:
    code = "import sys, kvpack.eval.ruler; print(sorted(m for m in ('matplotlib', 'kvpack.cli') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- command line -------------------------------------------------------------------------------------------


def test_cli_defaults_and_help() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["ruler"])
    assert (args.caches, args.tasks, args.lengths, args.samples, args.seed) == (
        "fp,k8v8,k4v4,k2v2",
        "niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt",
        "1024,2048,4096,8192",
        20,
        0,
    )
    assert not args.chat and args.func is cli.cmd_ruler
    assert Path(args.json) == Path("benchmarks/results/ruler.json") and Path(args.png).suffix == ".png"
    assert "RULER's long-context tasks" in parser.format_help()


def test_cli_runs_and_writes(
    tokenizer: Any, device: torch.device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvpack.models

    model = _tiny(tokenizer).to(device)  # its own: the command switches its attention to kvpack's
    monkeypatch.setattr(kvpack.models, "load_model", lambda *args, **kwargs: (model, tokenizer))
    out = tmp_path / "ruler"
    argv = ["ruler", "--caches", "fp,k2v2-plain-r32", "--tasks", "niah_multikey", "--lengths", "300", "--samples", "1"]
    argv += ["--json", f"{out}.json", "--markdown", f"{out}.md", "--png", f"{out}.png"]
    args = cli.build_parser().parse_args(argv)
    assert args.func(args) == 0
    result = json.loads(Path(f"{out}.json").read_text())
    assert result["command"] == (
        "kvpack ruler --caches fp,k2v2-plain-r32 --tasks niah_multikey --lengths 300 --samples 1 --seed 0 "
        "--dtype float32 --device cpu --threads 0"
    )
    assert result["caches"] == ["fp", "k2v2-plain-g64-r32"] and result["tasks"] == ["niah_multikey"]
    assert Path(f"{out}.md").is_file() and Path(f"{out}.png").is_file()
    assert result["attention"] == "kvpack" and "through kvpack's fused attention" in Path(f"{out}.md").read_text()
    for argv in (["--lengths", "4096"], ["--tasks", "vt", "--lengths", "200"]):
        args = cli.build_parser().parse_args(["ruler", *argv, "--json", f"{out}.json"])
        with pytest.raises(KVPackError, match=r"maximum context|too short for vt"):
            args.func(args)


def test_cli_bad_arguments_fail_before_loading_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvpack.models

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(kvpack.models, "load_model", no_load)
    for argv, message in (
        (["--caches", "fp,k5v4"], "bits=5"),
        (["--tasks", "niah_single,cwe"], "cwe unknown"),
        (["--lengths", "-1"], "--lengths"),
        (["--samples", "0"], "samples 0"),
    ):
        args = cli.build_parser().parse_args(["ruler", *argv])
        with pytest.raises(KVPackError, match=message):
            args.func(args)


def test_checkpoint_resumes_without_asking_again(
    tiny_model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run given a checkpoint file records each sample there; a later run with it asks only what is missing (more
    samples, another cache), and its result equals a run without one. Other settings, or a cut-off last line."""
    asked: list[tuple[str, str, int]] = []

    def answer(model: Any, tokenizer: Any, prompt: ruler.RulerPrompt, cache: Any, max_new_tokens: int) -> str:
        asked.append((type(cache).__name__, prompt.sample.task, prompt.n_tokens))
        found = prompt.sample.answers[:1] if isinstance(cache, KVPackCache) else prompt.sample.answers
        return " " + ", ".join(found)

    monkeypatch.setattr(ruler, "generate_answer", answer)
    checkpoint = tmp_path / "ruler.jsonl"
    settings = {"tasks": "niah_single,niah_multiquery", "lengths": [256], "progress": False}
    first = run_ruler(tiny_model, tokenizer, caches=["fp"], samples=2, checkpoint=checkpoint, **settings)
    assert len(asked) == 4 and first["resumed_runs"] == 0
    asked.clear()
    resumed = run_ruler(tiny_model, tokenizer, caches=TINY_CACHES, samples=3, checkpoint=checkpoint, **settings)
    assert sorted(name for name, *_ in asked) == ["DynamicCache"] * 2 + ["KVPackCache"] * 6  # fp: the third samples
    assert resumed["resumed_runs"] == 4
    asked.clear()
    plain = run_ruler(tiny_model, tokenizer, caches=TINY_CACHES, samples=3, **settings)
    assert len(asked) == 12
    drop = ("generate_s", "shared_prefill_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed["runs"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in plain["runs"]
    ]
    assert resumed["cells"] == plain["cells"] and resumed["checkpoint"] == str(checkpoint)
    assert "4 were taken from the checkpoint" in to_markdown(resumed)
    cells = {(r["task"], r["sample"]): r["shared_prefill_s"] for r in plain["runs"]}
    answers = sum(r["generate_s"] for r in plain["runs"])
    assert plain["compute_s"] == pytest.approx(sum(cells.values()) + answers, abs=0.1)
    # A run cut off mid-line loses that line only; other settings are refused before anything runs.
    text = checkpoint.read_text()
    checkpoint.write_text(text + text.splitlines()[-1][:40])
    asked.clear()
    run_ruler(tiny_model, tokenizer, caches=TINY_CACHES, samples=3, checkpoint=checkpoint, **settings)
    assert asked == []
    with pytest.raises(KVPackError, match="seed"):
        run_ruler(tiny_model, tokenizer, caches=TINY_CACHES, samples=3, seed=1, checkpoint=checkpoint, **settings)
