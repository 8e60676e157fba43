"""Random-weight models that stand in for real families kvpack has no weights of (no downloads at run time)."""

from __future__ import annotations

from typing import Any

import torch

# Key-projection biases of the stand-in below: one channel in 8 carries an offset of this standard deviation, the
# rest of 1 (the keys themselves are of order 1 there).
LARGE_KEY_BIAS_STD = 100.0


def biased_key_model(vocab_size: int, bias_std: float = LARGE_KEY_BIAS_STD, seed: int = 0) -> Any:
    """A tiny random Qwen2 (4 layers, 4 query heads, 2 KV heads of 64 dims, float32) whose key projections carry large
    per-channel biases: the kind of key offsets (biased q/k/v projections, few KV heads) that make rotating keys
    before quantizing them costly, as on a held-out real model of that family (see `benchmarks/key_rotation.py`).

    One channel in 8, chosen at random per layer, gets a bias of standard deviation `bias_std`; after the rotary
    embedding that offset turns with the position, so those channels vary far more over a group of tokens than
    the others. Per-channel key groups keep that variation in its own channels; a rotation spreads it over all.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,  # head_dim 64
        intermediate_size=512, vocab_size=vocab_size, max_position_embeddings=4096, initializer_range=0.05,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias
            bias.copy_(torch.randn(bias.shape, generator=generator))
            large = torch.randperm(bias.numel(), generator=generator)[: bias.numel() // 8]
            bias[large] = torch.randn(large.numel(), generator=generator) * bias_std
    return model


# Real models' shapes, written out (no download, no weights): `kvpack bench decode --model-shape NAME` decodes with a
# random-weight model of that shape, whose speed is the real model's (weights' values do not change the work).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B's config.json (its long-context RoPE scaling left out: it does not change the work)
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
}  # fmt: skip


def shaped_model(name: str, dtype: str = "float32", seed: int = 0) -> Any:
    """A random-weight causal LM of the shape `MODEL_SHAPES[name]` (raises ConfigError for an unknown name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvpack.errors import ConfigError

    if name not in MODEL_SHAPES:
        raise ConfigError(f"--model-shape {name!r}: use one of {', '.join(MODEL_SHAPES)}.")
    options = dict(MODEL_SHAPES[name])
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # small normal weights, unit norms: finite activations at any length
            parameter.normal_(0.0, 0.02, generator=generator)
        for name_, parameter in model.named_parameters():
            if "norm" in name_:
                parameter.fill_(1.0)
    model.tie_weights()
    return model.eval()
