"""transformers' text-generation pipeline with packed caches: a cache passed to a one-prompt call, and
`KVPackTextGenerationPipeline` (a fresh cache per generate call) for lists of prompts, batched or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from kvpack import ConfigError, KVPackCache, KVPackError, KVPackTextGenerationPipeline
from kvpack.compat import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPEC = "k8v8-g16"  # the tiny model's head dim is 16
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived", "Hi"]
GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer): the tiny Llama with the default model's tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def texts(outputs: list[Any]) -> list[Any]:
    return [output[0]["generated_text"] for output in outputs]


def test_a_cache_passed_to_a_one_prompt_call_matches_the_default_cache(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for prompt in PROMPTS:
        cache = KVPackCache(model, SPEC)
        assert pipe(prompt, **cache_kwargs(model, cache), **GREEDY) == pipe(prompt, **GREEDY)  # cache= from 5.25
        assert cache.get_seq_length() > 0  # the call generated with it


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_each_prompt_of_a_list_gets_its_own_cache(
    tiny: tuple[Any, Any], batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    made: list[KVPackCache] = []
    monkeypatch.setattr("kvpack.pipeline.KVPackCache", lambda *a, **k: made.append(KVPackCache(*a, **k)) or made[-1])
    reference = pipeline("text-generation", model=model, tokenizer=tokenizer)
    single = [reference(prompt, **GREEDY) for prompt in PROMPTS]
    pipe = pipeline(
        "text-generation", model=model, tokenizer=tokenizer, pipeline_class=KVPackTextGenerationPipeline,
        cache_config=SPEC,
    )  # fmt: skip
    assert isinstance(pipe, KVPackTextGenerationPipeline) and pipe.cache_config.spec.startswith(SPEC)
    assert texts(pipe(PROMPTS, batch_size=batch_size, **GREEDY)) == texts(single)
    # one cache per generate call (per batch), each filled by its own call
    assert len(made) == -(-len(PROMPTS) // batch_size) and all(cache.get_seq_length() > 0 for cache in made)


def test_chats_go_through_the_pipeline_too(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:2]]
    reference = pipeline("text-generation", model=model, tokenizer=tokenizer)
    pipe = pipeline(
        "text-generation", model=model, tokenizer=tokenizer, pipeline_class=KVPackTextGenerationPipeline,
        cache_config=SPEC,
    )  # fmt: skip
    assert pipe(chats, batch_size=2, **GREEDY) == reference(chats, batch_size=2, **GREEDY)


def test_a_cache_passed_to_the_kvpack_pipeline_is_refused(tiny: tuple[Any, Any]) -> None:
    """One cache for a list of prompts would be shared: the second prompt would continue from the first's tokens."""
    model, tokenizer = tiny
    pipe = pipeline(
        "text-generation", model=model, tokenizer=tokenizer, pipeline_class=KVPackTextGenerationPipeline,
        cache_config=SPEC,
    )  # fmt: skip
    with pytest.raises(KVPackError, match=r"makes a fresh KVPackCache .* for each generate call; pass no cache="):
        pipe(PROMPTS, cache=KVPackCache(model, SPEC), **GREEDY)


def test_a_bad_cache_config_fails_when_the_pipeline_is_made(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="bits=9"):
        pipeline(
            "text-generation", model=model, tokenizer=tokenizer, pipeline_class=KVPackTextGenerationPipeline,
            cache_config="k9v9",
        )  # fmt: skip


@pytest.mark.slow
def test_the_pipeline_on_the_default_model(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    chats = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi!"}]]
    greedy = {"max_new_tokens": 16, "do_sample": False}
    reference = pipeline("text-generation", model=model, tokenizer=tokenizer)
    pipe = pipeline(
        "text-generation", model=model, tokenizer=tokenizer, pipeline_class=KVPackTextGenerationPipeline,
        cache_config="k8v8",
    )  # fmt: skip
    outputs = pipe(chats, batch_size=2, **greedy)
    assert outputs == [reference(chat, **greedy) for chat in chats]
    assert "Paris" in outputs[0][0]["generated_text"][-1]["content"]
