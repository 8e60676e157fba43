"""Models the tests run: tiny random-weight ones built locally, random prompts for them, and the embedded default
model (SmolLM2-135M-Instruct) with its tokenizer.

The two tiny models: a Llama (full attention only, head_dim 16) and a Gemma 3 text model whose layers mix a sliding
window of 8 tokens with full attention (head_dim 32); both 2 layers, 4 query and 2 KV heads, vocab 128, context 256.
With group 16 and residual 0 / 16 / 32 their caches start packing after a few dozen tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

VOCAB = 128
CONTEXT = 256


def llama_config(**overrides: Any) -> LlamaConfig:
    """The tiny Llama's config; `overrides` replace its fields (e.g. `num_hidden_layers=3`)."""
    fields: dict[str, Any] = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=VOCAB, head_dim=16, max_position_embeddings=CONTEXT,
    )  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})


def gemma_config() -> Gemma3TextConfig:
    """The tiny Gemma 3: a sliding-window layer of 8 tokens, then a full-attention layer."""
    return Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=VOCAB, head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=CONTEXT,
    )  # fmt: skip


def tiny_llama(**overrides: Any) -> PreTrainedModel:
    """The tiny Llama with seeded random weights (the same every call), in eval mode."""
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(**overrides)).eval()


def tiny_gemma() -> PreTrainedModel:
    """The tiny Gemma 3 with seeded random weights (the same every call), in eval mode."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(gemma_config()).eval()


def prompt(batch: int = 1, tokens: int = 40, seed: int = 1) -> torch.Tensor:
    """Random token ids `[batch, tokens]` for the tiny models (ids 0 and 1 left out: 0 pads)."""
    return torch.randint(2, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) `[3, 37]`: rows 0 and 1 left-padded with 5 and 17 pad tokens, row 2 full."""
    ids = prompt(batch=3, tokens=37, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :17] = 0
    ids[mask == 0] = 0
    return ids, mask


@functools.cache
def default_tokenizer() -> Any:
    """The embedded default model's tokenizer, loaded once per process and shared: copy it before changing it."""
    from transformers import AutoTokenizer

    from kvpack.models import default_model_file

    gguf = default_model_file()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def default_model(device: torch.device) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of the embedded default model, float32, on `device` (seeded, so loading is repeatable)."""
    from kvpack.models import load_model

    torch.manual_seed(0)
    return load_model(None, dtype="float32", device=device, verbose=False)


def save_tiny_llama_with_default_tokenizer(path: Path) -> Path:
    """Save at `path` a tiny random-weight Llama (2 layers, 2 KV heads, head_dim 16) whose vocabulary is the default
    model's, with that tokenizer: a model directory the CLI and the benchmarks load in a second."""
    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = llama_config(vocab_size=len(tokenizer), max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
