"""Multi-turn conversations that keep one packed cache across turns: each turn prefills only its new tokens.

`Conversation.say` renders the whole message list with the tokenizer's chat template (so every turn's input is
what a fresh prefill of the conversation would read), keeps the cached tokens that the new rendering starts with,
and lets `generate` run the rest. A template may render earlier turns differently once more follow (some strip a
reply's reasoning, trim whitespace, or tokenize a reply's text otherwise than it was generated): the cache then
drops its tokens after the first difference (`crop`), which a `KVPackCache` can do for the tokens in its exact
window; deeper differences raise `UnsupportedOperationError` and leave the conversation as it was.

After `generate` the cache holds the prompt and every generated token but the last (generate never feeds its last
token back); the conversation tracks those ids (`cached_ids`) and the next turn prefills from there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvpack.cache.cache import KVPackCache
from kvpack.compat import cache_kwargs
from kvpack.config import DEFAULT_PRESET, CacheConfig
from kvpack.errors import KVPackError, UnsupportedOperationError

_SPLIT = "\x00kvpack-text\x00"
MESSAGES_FORMAT = "kvpack.conversation"
# Generation options that would make `generate` leave the cache with more than one sequence.
_SEVERAL_SEQUENCES = ("num_beams", "num_return_sequences")


def chat_parts(tokenizer: Any) -> tuple[str, str]:
    """The chat template's text before and after one user message's content (`("", "")` without a template).

    Raises KVPackError when the template changes the content itself (it cannot then be cut around it)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    messages = [{"role": "user", "content": _SPLIT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str) or text.count(_SPLIT) != 1:
        raise KVPackError(
            "this tokenizer's chat template changes the user's text, so a prefix cannot be cut around it; "
            "use raw text (--no-chat) with a prefix cache."
        )
    head, tail = text.split(_SPLIT)
    return head, tail


def messages_path(path: str | os.PathLike[str]) -> Path:
    """Where `Conversation.save` writes the messages of a conversation saved at `path`: `<path>.messages.json`."""
    path = Path(path)
    return path.with_name(path.name + ".messages.json")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass(frozen=True)
class Turn:
    """One exchange of a `Conversation`.

    user, reply: the texts (`user` as sent, before any `context` was put in front of it). reused_tokens: prompt
    tokens the cache already held; new_tokens: prompt tokens prefilled by this turn; generated_tokens: the reply's
    tokens (an end-of-turn token included). seconds: the turn's `generate` (its prefill and decode). cache_tokens,
    cache_nbytes: what the cache holds after the turn (`nbytes()`; None for a cache without it).
    """

    user: str
    reply: str
    reused_tokens: int
    new_tokens: int
    generated_tokens: int
    seconds: float
    cache_tokens: int
    cache_nbytes: int | None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the turn (its prefill included)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


class Conversation:
    """A chat that continues from its cache across turns, prefilling only what each turn adds.

    >>> chat = Conversation(model, tokenizer, "k4v4", system="Answer briefly.")
    >>> chat.say("Name a prime number.")
    >>> chat.say("And a larger one?", max_new_tokens=32)   # prefills only this turn's tokens
    >>> chat.turns[-1].new_tokens, chat.turns[-1].cache_nbytes
    >>> chat.save("chat.kvpc")                             # the cache, and the messages beside it
    >>> chat = Conversation.load("chat.kvpc", model, tokenizer)

    Replies are greedy unless `say` is given sampling options. `messages` (the chat so far, system prompt first when
    there is one) may be edited between turns: the next turn keeps the cached tokens the new rendering starts with.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cache: Cache | CacheConfig | str | os.PathLike[str] = DEFAULT_PRESET,
        system: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        context: str | None = None,
        backend: str = "auto",
    ):
        """model, tokenizer: a transformers causal LM and its tokenizer, which must have a chat template.

        cache: a spec, preset, `CacheConfig` or profile path (a fresh `KVPackCache` is made with `backend`), or a
        cache to continue from: an empty one, or one whose `prefix_ids` are the tokens it holds (`KVPackCache.load`,
        `kvpack.prefix_cache`, another conversation's cache), batch 1. Any transformers `Cache` works (e.g. a
        `DynamicCache` as a full-precision reference); `save` needs a `KVPackCache`.

        system: a system message to start with. messages: the conversation so far (when continuing a saved one; not
        with `system`). context: text that starts the first user message, followed by a blank line, e.g. the
        document a `kvpack cache build` prefix holds (then the first turn prefills only the question).
        Raises KVPackError for a tokenizer without a chat template, a cache whose tokens are unknown or of several
        sequences, or conflicting arguments.
        """
        if not getattr(tokenizer, "chat_template", None):
            raise KVPackError("a Conversation needs a tokenizer with a chat template (this one has none).")
        if system is not None and messages:
            raise KVPackError("give the system prompt as the first of `messages`, or `system` without `messages`.")
        self.model = model
        self.tokenizer = tokenizer
        self.cache: Cache = (
            cache if isinstance(cache, Cache) else KVPackCache(model, cache, backend=backend, tokenizer=tokenizer)
        )
        self.messages: list[dict[str, str]] = [dict(m) for m in messages or []]
        if system is not None:
            self.messages.append({"role": "system", "content": system})
        if context is not None and any(m["role"] == "user" for m in self.messages):
            raise KVPackError("`context` starts the first user message, and `messages` already has one.")
        self.context = context
        self.turns: list[Turn] = []
        held = self.cache.get_seq_length()
        prefix = getattr(self.cache, "prefix_ids", None)
        if held and (prefix is None or tuple(prefix.shape) != (1, held)):
            known = "no ids" if prefix is None else f"ids of shape {tuple(prefix.shape)}"
            raise KVPackError(
                f"the cache holds {held} tokens but {known}: a Conversation continues a cache whose `prefix_ids` are "
                "every token it holds, of one sequence (from KVPackCache.load, kvpack.prefix_cache or another "
                "Conversation), or an empty one."
            )
        self.cached_ids: list[int] = prefix[0].tolist() if held and prefix is not None else []
        """The ids of the tokens the cache holds: the conversation so far, less the last generated token."""

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any, tokenizer: Any, backend: str = "auto") -> Conversation:
        """A conversation continuing from a prompt-cache file (`KVPackCache.load` checks it and the model).

        A file written by `Conversation.save` continues that conversation (its messages are read from
        `messages_path(path)`). Any other file, e.g. from `kvpack cache build`, holds a document: its tokens must start
        with the chat template's opening of a user message, and the rest is the document, which becomes the start of
        the first user message (`context`); the first turn then prefills only what follows it.
        """
        cache = KVPackCache.load(path, model, tokenizer, backend=backend)
        assert cache.prefix_ids is not None
        saved = messages_path(path)
        if saved.is_file():
            messages, context = read_messages(saved)
            return cls(model, tokenizer, cache, messages=messages, context=context)
        cached = cache.prefix_ids[0].tolist()
        head = tokenizer(chat_parts(tokenizer)[0], add_special_tokens=False).input_ids
        if not head or cached[: len(head)] != head:
            raise KVPackError(
                f"{path} does not start with the chat template's opening of a user message (was it built with "
                "--no-chat?), and there is no saved conversation beside it; a Conversation continues a chat prefix."
            )
        document = tokenizer.decode(cached[len(head) :], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return cls(model, tokenizer, cache, context=document)

    def token_ids(self, user_text: str) -> list[int]:
        """The ids a turn saying `user_text` reads: the whole conversation and the new message, rendered by the chat
        template with the generation prompt."""
        return self._render(self._with_user(user_text))

    def say(self, user_text: str, max_new_tokens: int = 256, **generate_kwargs: Any) -> str:
        """Add a user message, generate the reply (greedy unless `generate_kwargs` say otherwise), add it, and
        return it. Only the tokens the cache does not hold are prefilled; the turn is recorded in `turns`.

        Raises UnsupportedOperationError (the conversation unchanged) when the rendering differs from the cached
        tokens where the cache cannot drop them, and KVPackError for options that would generate several sequences.
        """
        for name in ("cache", "past_key_values", "input_ids", "attention_mask"):
            if name in generate_kwargs:
                raise KVPackError(f"say() passes its own {name}; remove it from the generate options.")
        for name in _SEVERAL_SEQUENCES:
            if generate_kwargs.get(name, 1) != 1:
                raise KVPackError(f"a Conversation continues one sequence: {name}={generate_kwargs[name]} is not 1.")
        messages = self._with_user(user_text)
        ids = self._render(messages)
        reused = self._keep_prefix(ids)
        options: dict[str, Any] = {"do_sample": False, **generate_kwargs}
        if self.tokenizer.pad_token_id is not None:
            options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        input_ids = torch.tensor([ids], device=self.model.device)
        start = time.perf_counter()
        try:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **cache_kwargs(self.model, self.cache),
                max_new_tokens=max_new_tokens,
                **options,
            )
        except BaseException:  # interrupted: what the cache holds past the prompt is unknown, the next turn drops it
            self._track(ids[: self.cache.get_seq_length()])
            raise
        seconds = time.perf_counter() - start
        new = getattr(out, "sequences", out)[0, len(ids) :].tolist()
        held = self.cache.get_seq_length()
        self._track((ids + new)[:held])  # all but the last generated token, which generate never feeds back
        reply = self.tokenizer.decode(new, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.context = None
        nbytes = self.cache.nbytes() if hasattr(self.cache, "nbytes") else None
        self.turns.append(Turn(user_text, reply, reused, len(ids) - reused, len(new), seconds, held, nbytes))
        return reply

    def save(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Write the cache to `path` (`KVPackCache.save`: its tokens, the model's and tokenizer's fingerprints) and
        the messages (and a `context` no turn has used yet) to `messages_path(path)`, for `Conversation.load`. Needs
        a `KVPackCache` that holds tokens."""
        if not isinstance(self.cache, KVPackCache):
            raise KVPackError(f"only a KVPackCache can be saved, not a {type(self.cache).__name__}.")
        if not self.cached_ids:
            raise KVPackError("the conversation has no tokens to save yet: say something first.")
        self.cache.save(path, self.model, token_ids=[self.cached_ids], tokenizer=self.tokenizer, name=name)
        data = {"format": MESSAGES_FORMAT, "messages": self.messages, "context": self.context}
        text = json.dumps(data, ensure_ascii=False, indent=1)
        messages_path(path).write_text(text + "\n", encoding="utf-8")

    def _track(self, cached_ids: list[int]) -> None:
        """Record the ids of the tokens the cache holds (also as a `KVPackCache`'s `prefix_ids`)."""
        self.cached_ids = cached_ids
        if isinstance(self.cache, KVPackCache):
            self.cache.prefix_ids = torch.tensor([cached_ids], dtype=torch.long)

    def _with_user(self, user_text: str) -> list[dict[str, str]]:
        content = user_text if self.context is None else f"{self.context}\n\n{user_text}"
        return [*self.messages, {"role": "user", "content": content}]

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids

    def _keep_prefix(self, ids: list[int]) -> int:
        """Drop the cached tokens after the first where `ids` differ (and the last, if `ids` add nothing, as generate
        needs one new token); the tokens kept."""
        keep = min(common_prefix(self.cached_ids, ids), len(ids) - 1)
        drop = self.cache.get_seq_length() - keep  # an interrupted turn may have left tokens past `cached_ids`
        if drop:
            try:
                if keep:
                    self.cache.crop(-drop)
                else:
                    self.cache.reset()
            except (UnsupportedOperationError, NotImplementedError, AttributeError) as exc:
                cached = self.tokenizer.decode(self.cached_ids[keep : keep + 8])
                rendered = self.tokenizer.decode(ids[keep : keep + 8])
                raise UnsupportedOperationError(
                    f"the chat template renders the conversation differently from the {len(self.cached_ids)} tokens "
                    f"the cache holds, from token {keep} on (cached {cached!r}, now {rendered!r}), and the cache "
                    f"cannot drop its {drop} newest tokens ({exc}). Start the cache over with "
                    "`Conversation(model, tokenizer, spec, messages=conversation.messages)` (one prefill of the whole "
                    "conversation), or use a residual window at least as long as the turns that change (e.g. -r512)."
                ) from exc
            self._track(self.cached_ids[:keep])
        return keep


def read_messages(path: str | os.PathLike[str]) -> tuple[list[dict[str, str]], str | None]:
    """The messages and the unused context `Conversation.save` wrote to `path`; raises KVPackError for a file that
    does not hold them."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KVPackError(f"cannot read the conversation's messages from {path}: {exc}") from exc
    messages = data.get("messages") if isinstance(data, dict) and data.get("format") == MESSAGES_FORMAT else None
    context = data.get("context") if isinstance(data, dict) else None
    if (
        not isinstance(messages, list)
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
        or not isinstance(context, str | None)
    ):
        raise KVPackError(
            f"{path} is not a conversation's messages (a {MESSAGES_FORMAT!r} JSON object with a list of "
            "{role, content} messages); remove it to load its prompt cache as a document."
        )
    return messages, context
