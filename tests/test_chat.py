"""Multi-turn conversations on one cache (`kvpack.chat.Conversation`) and the `kvpack chat` command.

Most run on a tiny random-weight Llama saved with the default model's tokenizer (its chat template included); one runs
the embedded default model (slow). A turn's reply must be what a fresh prefill of the whole conversation generates.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvpack import KVPackCache, KVPackError, UnsupportedOperationError, cli, prefix_cache
from kvpack.cache.persist import read_cache_file
from kvpack.chat import Conversation, chat_parts, messages_path, read_messages
from kvpack.compat import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPEC = "k8v8-g16"  # the tiny model's head dim is 16
SMALL_WINDOW = "k8v8-g16-r16"  # packs after a few dozen tokens: the turns cross packed blocks
TURNS = ["Hello, who are you?", "What is the capital of France?", "And the capital of Italy?"]
DOCUMENT = (
    "The lighthouse at Point Amour was built in 1857. Its keepers lit the lamp every evening, and in 1957 the light "
    "was converted to electricity."
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer): the tiny Llama with the default model's tokenizer and chat template."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def fresh_reply(model: Any, tokenizer: Any, ids: list[int], spec: str, max_new_tokens: int) -> str:
    """The greedy reply after a fresh prefill of `ids` with an empty cache of `spec`."""
    input_ids = torch.tensor([ids], device=model.device)
    cache = KVPackCache(model, spec)
    out = model.generate(
        input_ids, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def assert_turns_equal_fresh_prefills(model: Any, tokenizer: Any, spec: str, max_new_tokens: int) -> Conversation:
    chat = Conversation(model, tokenizer, spec, system="Answer briefly.")
    for text in TURNS:
        ids = chat.token_ids(text)
        reply = chat.say(text, max_new_tokens=max_new_tokens)
        assert reply == fresh_reply(model, tokenizer, ids, spec, max_new_tokens)
        turn = chat.turns[-1]
        assert turn.reused_tokens + turn.new_tokens == len(ids)
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * len(TURNS)
    assert all(turn.reused_tokens > 0 for turn in chat.turns[1:])
    return chat


@pytest.mark.parametrize("spec", [SPEC, SMALL_WINDOW])
def test_each_turn_equals_a_fresh_prefill_of_the_conversation(tiny: tuple[Any, Any], spec: str) -> None:
    assert_turns_equal_fresh_prefills(*tiny, spec, max_new_tokens=10)


@pytest.mark.slow
def test_each_turn_equals_a_fresh_prefill_on_the_default_model(default_model: tuple[Any, Any]) -> None:
    chat = assert_turns_equal_fresh_prefills(*default_model, "k8v8", max_new_tokens=24)
    assert "Paris" in chat.messages[4]["content"]


class ForwardLengths:
    """The number of tokens each forward of `model` reads (a hook on its input embeddings)."""

    def __init__(self, model: Any):
        self.lengths: list[int] = []
        self.handle = model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: self.lengths.append(args[0].shape[1])
        )

    def __enter__(self) -> ForwardLengths:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def test_a_turn_prefills_only_its_new_tokens(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, SPEC)
    for text in TURNS:
        ids, held_before = chat.token_ids(text), chat.cache.get_seq_length()
        with ForwardLengths(model) as forwards:
            chat.say(text, max_new_tokens=6, min_new_tokens=6)
        turn = chat.turns[-1]
        # The first forward is the prefill: only the tokens after the kept cached ones; then one token per step.
        assert forwards.lengths == [turn.new_tokens] + [1] * 5
        assert turn.reused_tokens <= held_before and turn.new_tokens == len(ids) - turn.reused_tokens
        # generate never feeds its last token back: the cache holds the prompt and all generated tokens but that one
        assert turn.generated_tokens == 6 and turn.cache_tokens == len(ids) + 5 == chat.cache.get_seq_length()
        assert chat.cached_ids == ids + chat.cached_ids[len(ids) :] and len(chat.cached_ids) == turn.cache_tokens
        assert chat.cache.prefix_ids.tolist() == [chat.cached_ids]  # the cache says what it holds (for save)
    assert chat.turns[0].reused_tokens == 0 and all(turn.reused_tokens > turn.new_tokens for turn in chat.turns[1:])


def test_cache_bytes_grow_with_the_turns(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, SMALL_WINDOW)
    for text in [*TURNS, "Tell me more about that, please, in many more words than before."]:
        chat.say(text, max_new_tokens=12)
    sizes = [turn.cache_nbytes for turn in chat.turns]
    assert sizes[-1] == chat.cache.nbytes() and all(b is not None and b > 0 for b in sizes)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes  # the exact window grows by doubling: steps
    assert [turn.cache_tokens for turn in chat.turns] == sorted(turn.cache_tokens for turn in chat.turns)
    assert all(turn.seconds > 0 and turn.tokens_per_s > 0 for turn in chat.turns)


def test_a_saved_conversation_continues_as_the_unsaved_one(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, SMALL_WINDOW, system="Answer briefly.")
    for text in TURNS[:2]:
        chat.say(text, max_new_tokens=10)
    chat.save(tmp_path / "chat.kvpc")
    assert read_messages(messages_path(tmp_path / "chat.kvpc")) == (chat.messages, None)
    resumed = Conversation.load(tmp_path / "chat.kvpc", model, tokenizer)
    assert resumed.messages == chat.messages and resumed.cached_ids == chat.cached_ids
    assert resumed.say(TURNS[2], max_new_tokens=10) == chat.say(TURNS[2], max_new_tokens=10)
    assert resumed.turns[0].new_tokens == chat.turns[-1].new_tokens and resumed.turns[0].reused_tokens > 0
    assert resumed.cached_ids == chat.cached_ids  # (bytes may differ: a loaded cache has no spare capacity)


def test_a_document_prefix_starts_the_first_message(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """A prefix built as `kvpack cache build` does (the template's opening of a user message, then the document) is
    reused: the first turn prefills only the question, and replies as a fresh prefill of document + question."""
    model, tokenizer = tiny
    ids = tokenizer(chat_parts(tokenizer)[0] + DOCUMENT, add_special_tokens=False).input_ids
    prefix_cache(model, [ids], SMALL_WINDOW).save(tmp_path / "doc.kvpc", model, tokenizer=tokenizer)
    chat = Conversation.load(tmp_path / "doc.kvpc", model, tokenizer)
    assert chat.context == DOCUMENT and chat.messages == []
    question = "When was the light converted?"
    full = chat.token_ids(question)
    reply = chat.say(question, max_new_tokens=10)
    assert chat.turns[0].reused_tokens == len(ids) and chat.turns[0].new_tokens == len(full) - len(ids)
    assert chat.messages[0] == {"role": "user", "content": f"{DOCUMENT}\n\n{question}"}
    assert reply == fresh_reply(model, tokenizer, full, SMALL_WINDOW, 10)
    assert reply == Conversation(model, tokenizer, SMALL_WINDOW, context=DOCUMENT).say(question, max_new_tokens=10)
    # saved before its first turn, the document is still the context
    Conversation.load(tmp_path / "doc.kvpc", model, tokenizer).save(tmp_path / "again.kvpc")
    assert Conversation.load(tmp_path / "again.kvpc", model, tokenizer).say(question, max_new_tokens=10) == reply


def test_a_raw_prefix_is_refused(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    prefix_cache(model, [tokenizer(DOCUMENT).input_ids], SPEC).save(tmp_path / "raw.kvpc", model)
    with pytest.raises(KVPackError, match="does not start with the chat template's opening of a user message"):
        Conversation.load(tmp_path / "raw.kvpc", model, tokenizer)


def test_a_changed_history_drops_the_cached_tokens_after_the_change(tiny: tuple[Any, Any]) -> None:
    """Templates may render earlier turns differently once more follow (stripped reasoning, trimmed text): the cache
    keeps the tokens up to the first difference, and the turn still replies as a fresh prefill of the conversation."""
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, SPEC)
    for text in TURNS[:2]:
        chat.say(text, max_new_tokens=8)
    chat.messages[-1]["content"] = "Paris."  # an edited reply
    ids, cached = chat.token_ids(TURNS[2]), list(chat.cached_ids)
    same = next(i for i, (a, b) in enumerate(zip(ids, cached, strict=False)) if a != b)
    reply = chat.say(TURNS[2], max_new_tokens=8)
    assert chat.turns[-1].reused_tokens == same < len(cached) and chat.cached_ids[:same] == cached[:same]
    assert reply == fresh_reply(model, tokenizer, ids, SPEC, 8)


def test_a_change_in_packed_tokens_is_a_clear_error(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, SMALL_WINDOW)
    chat.say("Please read this first: " + DOCUMENT, max_new_tokens=12)
    chat.messages[0]["content"] = "Something else entirely."  # the first user message: its tokens are packed now
    before = (copy.deepcopy(chat.messages), list(chat.cached_ids), chat.cache.get_seq_length())
    with pytest.raises(UnsupportedOperationError, match="renders the conversation differently") as error:
        chat.say(TURNS[1], max_new_tokens=4)
    assert "cannot drop its" in str(error.value) and "messages=conversation.messages" in str(error.value)
    assert (chat.messages, chat.cached_ids, chat.cache.get_seq_length()) == before and len(chat.turns) == 1
    # What the error advises: one prefill of the conversation as it is now.
    restarted = Conversation(model, tokenizer, SMALL_WINDOW, messages=chat.messages)
    ids = restarted.token_ids(TURNS[1])
    assert restarted.say(TURNS[1], max_new_tokens=4) == fresh_reply(model, tokenizer, ids, SMALL_WINDOW, 4)
    assert restarted.turns[0].reused_tokens == 0


def test_an_interrupted_turn_leaves_the_conversation_usable(tiny: tuple[Any, Any]) -> None:
    """Interrupted mid-reply (Ctrl-C in `kvpack chat`), the cache holds tokens the conversation never recorded: the
    next turn drops them, and replies as a fresh prefill of the conversation."""
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, SPEC)
    chat.say(TURNS[0], max_new_tokens=6)

    def interrupt(input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.shape[1] > prompt_len + 3:
            raise KeyboardInterrupt
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    prompt_len = len(chat.token_ids(TURNS[1]))
    with pytest.raises(KeyboardInterrupt):
        chat.say(TURNS[1], max_new_tokens=8, stopping_criteria=[interrupt])
    assert len(chat.turns) == 1 and chat.cache.get_seq_length() > len(chat.cached_ids) == prompt_len
    ids = chat.token_ids(TURNS[1])
    assert chat.say(TURNS[1], max_new_tokens=6) == fresh_reply(model, tokenizer, ids, SPEC, 6)
    assert chat.turns[-1].reused_tokens == len(ids) - 1  # all but the last prompt token, which generate needs


def test_any_transformers_cache_works(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    chat = Conversation(model, tokenizer, DynamicCache(config=model.config))
    for text in TURNS[:2]:
        chat.say(text, max_new_tokens=6)
    assert chat.turns[-1].reused_tokens > 0 and chat.turns[-1].cache_nbytes is None
    with pytest.raises(KVPackError, match="only a KVPackCache can be saved"):
        chat.save("unused.kvpc")


def test_bad_arguments_are_clear_errors(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(KVPackError, match="needs a tokenizer with a chat template"):
        Conversation(model, plain, SPEC)
    with pytest.raises(KVPackError, match="or `system` without `messages`"):
        Conversation(model, tokenizer, SPEC, system="Hi", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(KVPackError, match="already has one"):
        Conversation(model, tokenizer, SPEC, messages=[{"role": "user", "content": "Hi"}], context=DOCUMENT)
    used = KVPackCache(model, SPEC)
    model(torch.tensor([[5, 6, 7]]), **cache_kwargs(model, used))
    with pytest.raises(KVPackError, match="holds 3 tokens but no ids"):
        Conversation(model, tokenizer, used)
    chat = Conversation(model, tokenizer, SPEC)
    with pytest.raises(KVPackError, match="continues one sequence: num_beams=2"):
        chat.say("Hi", num_beams=2)
    with pytest.raises(KVPackError, match="passes its own cache"):
        chat.say("Hi", cache=used)
    with pytest.raises(KVPackError, match="say something first"):
        chat.save(tmp_path / "empty.kvpc")
    assert chat.messages == [] and chat.turns == []
    (tmp_path / "bad.json").write_text(json.dumps({"format": "kvpack.conversation", "messages": [{"content": "x"}]}))
    with pytest.raises(KVPackError, match="is not a conversation's messages"):
        read_messages(tmp_path / "bad.json")


# -- kvpack chat ------------------------------------------------------------------------------------------------------

TURN_LINE = re.compile(
    r"\[turn (\d+)\] cache [\d.]+ [KMG]?i?B for ([\d,]+) tokens; prompt ([\d,]+) new tokens \(([\d,]+) reused\); "
    r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)"
)


def chat_argv(model_dir: Path, *args: str) -> list[str]:
    return ["chat", "--model", str(model_dir), "--max-new-tokens", "8", "--backend", "torch", *args]


def run_chat(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], lines: list[str]
) -> tuple[int, list[str], str]:
    """`kvpack chat` with `lines` piped on stdin: (exit status, stdout lines, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def turn_stats(err: str) -> list[tuple[int, int, int, int]]:
    """(turn, cache tokens, new prompt tokens, reused tokens) of each per-turn line on stderr."""
    return [tuple(int(g.replace(",", "")) for g in m.groups()) for m in TURN_LINE.finditer(err)]  # type: ignore[misc]


def test_chat_reads_turns_from_stdin_and_saves(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = chat_argv(tiny_model_dir, "--cache", SMALL_WINDOW, "--system", "Answer briefly.")
    code, replies, err = run_chat(
        monkeypatch, capsys, [*argv, "--save", str(tmp_path / "c.kvpc")], [TURNS[0], "", TURNS[1]]
    )
    assert code == 0 and len(replies) == 2, err
    stats = turn_stats(err)
    assert [s[0] for s in stats] == [1, 2] and stats[0][3] == 0 and stats[1][3] > 0
    assert stats[1][1] > stats[0][1]  # the cache holds both turns
    assert f"wrote {tmp_path / 'c.kvpc'} ({stats[1][1]:,} tokens, 5 messages)" in err
    assert (tmp_path / "c.kvpc").is_file() and messages_path(tmp_path / "c.kvpc").is_file()

    # Continuing the saved conversation replies as one run of all three turns does, and reuses the cached tokens.
    code, resumed, err = run_chat(
        monkeypatch, capsys, chat_argv(tiny_model_dir, "--prefix-cache", str(tmp_path / "c.kvpc")), TURNS[2:]
    )
    assert code == 0, err
    assert f"Loaded a conversation of 5 messages ({stats[1][1]:,} tokens)" in err
    assert turn_stats(err)[0][3] > 0
    code, at_once, _ = run_chat(monkeypatch, capsys, argv, TURNS)
    assert code == 0 and at_once == [*replies, *resumed]


def test_chat_continues_a_cache_build_document(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    out = tmp_path / "doc.kvpc"
    build = ["cache", "build", "--model", str(tiny_model_dir), "--prompt-file", str(tmp_path / "doc.txt")]
    assert cli.main([*build, "-o", str(out), "--cache", SMALL_WINDOW]) == 0
    assert "wrote" in capsys.readouterr().out
    tokens = read_cache_file(out).header.tokens
    code, replies, err = run_chat(
        monkeypatch, capsys, chat_argv(tiny_model_dir, "--prefix-cache", str(out)), ["When?", "Why?"]
    )
    assert code == 0 and len(replies) == 2, err
    assert f"Loaded a document ({tokens:,} tokens)" in err
    stats = turn_stats(err)
    assert stats[0][3] == tokens and stats[0][2] < 20  # the document is reused, only the question is prefilled


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prefix-cache", "missing.kvpc"], "does not exist; make one with `kvpack cache build`"),
        (["--prefix-cache", __file__, "--system", "Hi"], "a prefix cache already holds the start of the conversation"),
        (["--save", "no/such/dir/c.kvpc"], "the directory no/such/dir does not exist"),
        (["--cache", "k9v9"], "bits=9 is not supported"),
    ],
)
def test_chat_errors_come_before_the_model_loads(
    extra: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("kvpack.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["chat", *extra]) == 2
    assert message in capsys.readouterr().err


def test_chat_asks_at_a_terminal(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def lines() -> Iterator[str]:
        yield from ("Hello", "  ")

    given = lines()

    def fake_input(prompt: str) -> str:
        asked.append(prompt)
        try:
            return next(given)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("sys.stdin", io.StringIO())
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", fake_input)
    assert cli.main(chat_argv(tiny_model_dir, "--cache", SPEC)) == 0
    assert asked == ["> "] * 3
    assert len(turn_stats(capsys.readouterr().err)) == 1
