"""`kvpack passkey`: prompt construction, scoring, the shared prefill, the result writers and the CLI options.

Prompts are built with the embedded default model's real tokenizer (read from its GGUF, a few seconds); runs use
a tiny random-weight Llama with that tokenizer's vocabulary, so they are fast and never answer on purpose.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from kvpack import cli
from kvpack.cache import KVPackCache
from kvpack.compat import cache_kwargs
from kvpack.errors import ConfigError, KVPackError
from kvpack.eval import passkey
from kvpack.eval.passkey import (
    INTRO,
    NEEDLE,
    QUESTION,
    build_prompt,
    extract_passkey,
    filled_cache,
    fit_lengths,
    generate_answer,
    is_correct,
    passkey_for,
    plot_heatmap,
    prefill,
    run_passkey,
    to_markdown,
)
from kvpack.harness.caches import make_cache, parse_cache_name
from kvpack.harness.results import parse_float_list, parse_int_list, publish

# A filler sentence is 4-6 tokens with this tokenizer: a prompt built to N tokens is at most N and fewer than
# one sentence (plus a token the join can merge) short of it.
LENGTH_SLACK = 8
TINY_CONTEXT = 512
TINY_CACHES = ["fp", "k4v4-plain-r32"]  # residual 32: the tiny prompts below are mostly packed


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from kvpack.models import default_model_file

    gguf = default_model_file()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_model(tokenizer: Any, device: torch.device) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=256,
        head_dim=64,  # kvpack's default group of 64 channels
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_CONTEXT,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval().to(device)


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- prompts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
@pytest.mark.parametrize("n_tokens", [120, 513, 1024, 4096, 8184])
def test_prompt_has_the_target_length(tokenizer: Any, n_tokens: int, chat: bool) -> None:
    prompt = build_prompt(tokenizer, n_tokens, 0.5, "48213", chat=chat)
    assert 0 <= n_tokens - prompt.n_tokens < LENGTH_SLACK, (n_tokens, prompt.n_tokens)
    # The ids are the text's own tokenization: what the model sees is what was measured.
    assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=not chat)["input_ids"]
    assert prompt.text.endswith("What is the pass key? The pass key is" if not chat else "The pass key is")
    assert prompt.text.count(INTRO) == 1


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("n_tokens", [600, 2048])
def test_needle_sits_at_the_requested_depth(tokenizer: Any, n_tokens: int, depth: float) -> None:
    key = passkey_for(0, n_tokens, depth, 0)
    prompt = build_prompt(tokenizer, n_tokens, depth, key)
    text, needle = prompt.text, NEEDLE.format(key=key)
    at = text.index(needle)
    # Measured here from the text, independently of the builder's own bookkeeping.
    before = _tokens(tokenizer, text[:at]) - _tokens(tokenizer, text[: text.index(INTRO) + len(INTRO)])
    after = _tokens(tokenizer, text[: text.rindex(QUESTION)]) - _tokens(tokenizer, text[: at + len(needle)])
    measured = before / (before + after)
    sentence = 6 / (before + after)  # one filler sentence, as a fraction of the haystack
    assert abs(measured - depth) <= sentence, (measured, depth)
    assert abs(prompt.depth - measured) < 0.01
    assert abs(prompt.needle_token - _tokens(tokenizer, text[:at])) <= 1
    # Of the whole prompt: off by at most the instructions, needle and question (~65 tokens).
    assert abs(prompt.needle_token / prompt.n_tokens - depth) < 65 / n_tokens
    # At a sentence boundary, on its own line.
    assert text[at - 1] == "\n" and text[at - 2] == "." and text[at + len(needle)] == "\n"


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_appears_exactly_once(tokenizer: Any, depth: float, chat: bool) -> None:
    key = passkey_for(3, 1024, depth, 1)
    prompt = build_prompt(tokenizer, 1024, depth, key, chat=chat)
    assert prompt.text.count(NEEDLE.format(key=key)) == 1
    assert prompt.text.count(key) == 2  # "The pass key is K. Remember it. K is the pass key."
    assert len(re.findall(r"\d{5}", prompt.text)) == 2


def test_prompt_too_short_or_bad_depth_is_a_clear_error(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="needs at least"):
        build_prompt(tokenizer, 20, 0.5, "12345")
    with pytest.raises(ConfigError, match="outside"):
        build_prompt(tokenizer, 1024, 1.5, "12345")


def test_keys_are_seeded_five_digit_numbers() -> None:
    keys = [passkey_for(0, 1024, 0.5, trial) for trial in range(20)]
    assert all(re.fullmatch(r"[1-9]\d{4}", key) for key in keys)
    assert len(set(keys)) == len(keys)
    assert keys == [passkey_for(0, 1024, 0.5, trial) for trial in range(20)]
    assert passkey_for(1, 1024, 0.5, 0) != passkey_for(0, 1024, 0.5, 0)


# -- scoring ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (" 48213.\n", "48213"),
        ("48213", "48213"),
        ("The pass key is 48213. Remember", "48213"),
        ("key:48213!", "48213"),
        ("12 345 67890 11111", "67890"),  # the first run of exactly five digits
        ("123456 and 48213", "48213"),  # six digits are not a 5-digit number
        ("1234", None),
        ("48,213", None),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_passkey(output: str, expected: str | None) -> None:
    assert extract_passkey(output) == expected


def test_is_correct_uses_the_first_five_digit_number() -> None:
    assert is_correct(" 48213.\nThe", "48213")
    assert not is_correct(" 48231.", "48213")
    assert not is_correct(" 12345 is not it, 48213 is", "48213")
    assert not is_correct(" the pass key.", "48213")


# -- lengths and arguments ----------------------------------------------------------------------------------


def test_lengths_beyond_the_context_are_refused_and_the_context_itself_fits() -> None:
    assert fit_lengths([8192, 1024, 1024], 8192) == [1024, 8184]
    with pytest.raises(KVPackError, match="maximum context of 8192"):
        fit_lengths([4096, 9000], 8192)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (lambda text: parse_int_list(text, "--lengths"), "1024,abc"),
        (lambda text: parse_int_list(text, "--lengths"), "0,1024"),
        (lambda text: parse_int_list(text, "--lengths"), ""),
        (lambda text: parse_float_list(text, "--depths"), "0.5,1.2"),
        (lambda text: parse_float_list(text, "--depths"), "half"),
        (passkey.parse_caches, "fp,k5v4"),
        (passkey.parse_caches, ","),
        (lambda text: passkey.check_settings([1024], [0.5], int(text)), "0"),
        (lambda text: passkey.check_settings([1024], [float(text)], 1), "1.5"),
    ],
)
def test_bad_arguments_are_config_errors(parse: Any, text: str) -> None:
    with pytest.raises(ConfigError):
        parse(text)


def test_caches_are_canonical_spec_names() -> None:
    assert list(passkey.parse_caches("fp, k4v4-plain,k4v4-plain-g64-r128,k2v2-plain-r32")) == [
        "fp",
        "k4v4-plain-g64-r128",
        "k2v2-plain-g64-r32",
    ]
    profile = "benchmarks/profiles/smollm2-3.5.json"  # a profile keeps its path: its table label does not parse back
    assert list(passkey.parse_caches(f"fp,{profile},balanced")) == ["fp", profile, "k4v4-g64-r128-s4-rotv"]


# -- the run ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp", "k4v4-plain-g64-r32", "k2v2-plain-g64-r32"])
def test_shared_prefill_stores_what_the_cache_own_prefill_stores(tiny_model: Any, tokenizer: Any, name: str) -> None:
    prompt = build_prompt(tokenizer, 300, 0.5, "48213")
    shared = filled_cache(parse_cache_name(name), tiny_model.config, prefill(tiny_model, prompt))
    own = make_cache(parse_cache_name(name), tiny_model.config)
    ids = torch.tensor([prompt.input_ids[:-1]], device=tiny_model.device)
    with torch.inference_mode():
        tiny_model(input_ids=ids, **cache_kwargs(tiny_model, own), use_cache=True)
    assert shared.get_seq_length() == own.get_seq_length() == prompt.n_tokens - 1
    for a, b in zip(shared.layers, own.layers, strict=True):
        dense_a = a.dense() if hasattr(a, "dense") else (a.keys, a.values)
        dense_b = b.dense() if hasattr(b, "dense") else (b.keys, b.values)
        assert all(torch.equal(x, y) for x, y in zip(dense_a, dense_b, strict=True))
    if name != "fp":
        assert isinstance(shared, KVPackCache) and shared.layers[0].packed_length > 0
    assert generate_answer(tiny_model, tokenizer, prompt, shared) == generate_answer(tiny_model, tokenizer, prompt, own)


def test_sliding_window_models_prefill_with_each_cache(tokenizer: Any) -> None:
    config = Gemma3TextConfig(
        hidden_size=64,
        num_attention_heads=1,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=64,
        head_dim=64,
        vocab_size=len(tokenizer),
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    # A DynamicCache would forget the window's old tokens before a kvpack cache could see them.
    assert prefill(model, build_prompt(tokenizer, 100, 0.5, "48213")) is None


def test_run_refuses_lengths_beyond_the_model_context(tiny_model: Any, tokenizer: Any) -> None:
    with pytest.raises(KVPackError, match=f"maximum context of {TINY_CONTEXT}"):
        run_passkey(tiny_model, tokenizer, caches=["fp"], lengths=[256, 1024], depths=[0.5], trials=1, progress=False)


@pytest.fixture(scope="module")
def tiny_result(tiny_model: Any, tokenizer: Any) -> dict[str, Any]:
    return run_passkey(
        tiny_model,
        tokenizer,
        caches=TINY_CACHES,
        lengths=[160, TINY_CONTEXT],  # the second one is capped to leave room for the answer
        depths=[0.2, 0.8],
        trials=2,
        model_name="tiny-llama",
        command="test",
        progress=False,
    )


def test_result_holds_every_cell_and_run(tiny_result: dict[str, Any]) -> None:
    lengths = [160, TINY_CONTEXT - passkey.MAX_NEW_TOKENS]
    assert tiny_result["lengths"] == lengths and tiny_result["requested_lengths"] == [160, TINY_CONTEXT]
    assert tiny_result["caches"] == ["fp", "k4v4-plain-g64-r32"] and tiny_result["shared_prefill"] is True
    assert tiny_result["notes"] and "maximum context" in tiny_result["notes"][0]
    for key in ("command", "date", "machine", "versions", "model", "depths", "trials", "seed"):
        assert key in tiny_result
    assert set(tiny_result["versions"]) >= {"kvpack", "torch", "transformers"}
    assert tiny_result["machine"]["platform"]
    assert len(tiny_result["runs"]) == 2 * 2 * 2 * 2
    for name in tiny_result["caches"]:
        assert list(tiny_result["accuracy"][name]) == [str(n) for n in lengths]
        for n_tokens in lengths:
            assert list(tiny_result["accuracy"][name][str(n_tokens)]) == ["0.2", "0.8"]
            runs = [r for r in tiny_result["runs"] if (r["cache"], r["length"]) == (name, n_tokens)]
            assert all(n_tokens - LENGTH_SLACK < r["prompt_tokens"] <= n_tokens for r in runs)
            assert all(r["correct"] == (r["answer"] == r["passkey"]) for r in runs)
    # Every cache is asked the same keys.
    keys = [[r["passkey"] for r in tiny_result["runs"] if r["cache"] == name] for name in tiny_result["caches"]]
    assert keys[0] == keys[1] and len(set(keys[0])) == len(keys[0])
    json.dumps(tiny_result)


def test_accuracy_is_the_mean_over_trials(tiny_model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers scripted per cache and trial: fp always right, k4v4-plain right on the first trial only."""

    def answer(model: Any, tokenizer: Any, prompt: passkey.PasskeyPrompt, cache: Any) -> str:
        trial = next(t for t in range(3) if passkey_for(0, 160, 0.5, t) == prompt.passkey)
        right = not isinstance(cache, KVPackCache) or trial == 0
        return f" {prompt.passkey}.\n" if right else " 11111."

    monkeypatch.setattr(passkey, "generate_answer", answer)
    result = run_passkey(
        tiny_model, tokenizer, caches=TINY_CACHES, lengths=[160], depths=[0.5], trials=3, progress=False
    )
    assert result["accuracy"]["fp"]["160"]["0.5"] == 1.0
    assert result["accuracy"]["k4v4-plain-g64-r32"]["160"]["0.5"] == pytest.approx(1 / 3)
    markdown = to_markdown(result)
    assert "| fp | 160 | 100% | 100% |" in markdown and "| k4v4-plain-g64-r32 | 160 | 33% | 33% |" in markdown


def test_writers_produce_json_markdown_and_png(tiny_result: dict[str, Any], tmp_path: Path) -> None:
    paths = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "plots" / "r.png"
    publish(tiny_result, paths[0], to_markdown, plot_heatmap, markdown_path=paths[1], png_path=paths[2])
    assert json.loads(paths[0].read_text())["accuracy"] == tiny_result["accuracy"]
    markdown = paths[1].read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    header, rows = table[0], table[1 : 1 + 2 * 2]
    assert header == "| cache | length | depth 0.2 | depth 0.8 | mean |"
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| fp", "160"],
        ["| fp", "504"],
        ["| k4v4-plain-g64-r32", "160"],
        ["| k4v4-plain-g64-r32", "504"],
    ]
    assert all(len(row.strip("|").split("|")) == 5 and row.endswith("% |") for row in rows)
    assert "`test`" in markdown and "Note:" in markdown and "run through the model once" in markdown
    assert "The full-precision cache itself misses" in markdown  # random weights: fp misses too
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_importing_passkey_does_not_import_matplotlib() -> None:
    code = "import sys, kvpack.eval.passkey; print(sorted(m for m in ('matplotlib', 'kvpack.cli') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- command line -------------------------------------------------------------------------------------------


def _parser() -> Any:
    return cli.build_parser()


def test_cli_defaults_and_help() -> None:
    parser = _parser()
    args = parser.parse_args(["passkey"])
    assert (args.caches, args.lengths, args.depths, args.trials) == (
        "fp,k8v8,k4v4,k2v2",
        "1024,2048,4096,8192",
        "0.1,0.3,0.5,0.7,0.9",
        3,
    )
    assert not args.chat and args.func is cli.cmd_passkey
    assert Path(args.json) == Path("benchmarks/results/passkey.json") and Path(args.png).suffix == ".png"
    assert "passkey retrieval by length and depth" in parser.format_help()


def test_cli_runs_and_writes(tiny_model: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvpack.models

    monkeypatch.setattr(kvpack.models, "load_model", lambda *args, **kwargs: (tiny_model, tokenizer))
    out = tmp_path / "pk"
    argv = ["passkey", "--caches", "fp,k2v2-plain-r32", "--lengths", "200", "--depths", "0.5", "--trials", "1"]
    argv += ["--json", f"{out}.json", "--markdown", f"{out}.md", "--png", f"{out}.png"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    result = json.loads(Path(f"{out}.json").read_text())
    assert (
        result["command"]
        == "kvpack passkey --caches fp,k2v2-plain-r32 --lengths 200 --depths 0.5 --trials 1 --seed 0 --dtype float32 "
        "--device cpu --threads 0"
    )
    assert result["caches"] == ["fp", "k2v2-plain-g64-r32"]
    assert Path(f"{out}.md").is_file() and Path(f"{out}.png").is_file()
    args = _parser().parse_args(["passkey", "--lengths", "4096", "--json", f"{out}.json"])
    with pytest.raises(KVPackError, match="maximum context"):
        args.func(args)


def test_cli_bad_spec_fails_before_loading_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvpack.models

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(kvpack.models, "load_model", no_load)
    for argv in (["--caches", "fp,k5v4"], ["--depths", "0.5,2"], ["--lengths", "-1"], ["--trials", "0"]):
        args = _parser().parse_args(["passkey", *argv])
        with pytest.raises(KVPackError):
            args.func(args)
