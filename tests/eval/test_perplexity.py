"""Streamed perplexity and agreement on a tiny random-weight model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpack import KVPackError
from kvpack.eval.perplexity import stream
from kvpack.harness.caches import parse_cache_name
from kvpack.texts import load_tokens


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=256, head_dim=16,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def ids(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))


def test_streamed_fp_equals_one_teacher_forced_pass(tiny_model: LlamaForCausalLM) -> None:
    tokens = ids(80)
    result, logprobs = stream(tiny_model, tokens, parse_cache_name("fp"), keep_logprobs=True, progress=False)
    with torch.no_grad():
        full = torch.log_softmax(tiny_model(tokens).logits[0, :-1].float(), -1)
    expected_nll = -full.gather(-1, tokens[0, 1:, None])[:, 0]
    # Same math, different kernel shapes (1-token vs 80-token attention): float32 rounding only.
    torch.testing.assert_close(result.nll, expected_nll, rtol=0, atol=1e-4)
    torch.testing.assert_close(logprobs, full, rtol=0, atol=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected_nll.double().mean().item()), rel=1e-4)
    assert result.kl is None and result.top1_agree is None


def test_agreement_with_itself_is_perfect_and_quantization_is_measured(tiny_model: LlamaForCausalLM) -> None:
    tokens = ids(80)
    reference, logprobs = stream(tiny_model, tokens, parse_cache_name("fp"), keep_logprobs=True, progress=False)
    same, _ = stream(tiny_model, tokens, parse_cache_name("fp"), reference_logprobs=logprobs, progress=False)
    assert same.kl is not None and same.top1_agree is not None
    assert same.kl.abs().max().item() < 1e-5 and bool(same.top1_agree.all())
    two_bit, _ = stream(
        tiny_model, tokens, parse_cache_name("k2v2-g16-r0"), reference_logprobs=logprobs, progress=False
    )
    eight_bit, _ = stream(
        tiny_model, tokens, parse_cache_name("k8v8-g16-r0"), reference_logprobs=logprobs, progress=False
    )
    assert two_bit.kl is not None and eight_bit.kl is not None
    # Residual 0: both quantize the past. KL in float32 rounds to ±1e-7 where the distributions match.
    assert two_bit.kl.mean() > 1e-5
    assert two_bit.kl.mean() > 10 * eight_bit.kl.abs().mean()
    summary = two_bit.summary(reference)
    assert summary["delta_ppl_pct"] == pytest.approx(100 * (two_bit.perplexity / reference.perplexity - 1))
    assert 1 <= summary["worst_position"] <= 79 and summary["cache_bytes_at_end"] > 0


def test_first_chunk_workaround_keeps_every_prediction(tiny_model: LlamaForCausalLM) -> None:
    spec = parse_cache_name("fp")
    spec.peer["backend"] = "hqq"  # only to exercise the two-token first call on a cache that runs anywhere
    tokens = ids(40)
    result, _ = stream(tiny_model, tokens, spec, progress=False)
    plain, _ = stream(tiny_model, tokens, parse_cache_name("fp"), progress=False)
    torch.testing.assert_close(result.nll, plain.nll, rtol=0, atol=1e-4)


def test_load_tokens_errors_are_clear(tmp_path) -> None:
    class Tok:
        def __call__(self, text: str, return_tensors: str):
            return type("E", (), {"input_ids": torch.arange(len(text.split()))[None]})()

    with pytest.raises(KVPackError, match="not found"):
        load_tokens(tmp_path / "missing.txt", Tok(), 10)
    path = tmp_path / "short.txt"
    path.write_text("a b c")
    with pytest.raises(KVPackError, match="only 3 tokens"):
        load_tokens(path, Tok(), 10)
    tokens, sha = load_tokens(path, Tok(), 2)
    assert tokens.tolist() == [[0, 1]] and len(sha) == 64
