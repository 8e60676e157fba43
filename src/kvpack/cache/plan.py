"""The shape of a packed cache, written once: which layers a model caches and how, and where its tokens go.

Everything that predicts a cache instead of filling one (prompt-cache files, calibration's emulation, `kvpack
memory`, the decode and long-run benchmarks) reads these functions, and `PackedLayer` follows them, so a rule
changes in one place:

- `layer_plan(config)`: per decoder layer, its cache kind (full attention, sliding window, none);
- `cache_shape(config)`: the cached tensors' shape (layers, KV heads, head dim) of a model config;
- `flushed_tokens(stored, config)`: how many of the tokens stored after the sinks are packed (the flush rule);
- `dropped_tokens(...)`: how many packed tokens a sliding-window layer forgets;
- `exact_capacity(config)`: the most tokens the exact buffer (sinks + residual window) ever holds;
- `packed_bytes(spec, tokens, head_dim)`: the bytes one (batch, head) row of packed tokens takes;
- `check_head_dims(config, key_dim, value_dim)`: whether the group sizes fit the model's head dims;
- `context_limit(config)`, `check_exact_tokens(...)`: the bound that keeps a configured window allocatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import PretrainedConfig

from kvpack.config import CacheConfig, QuantSpec
from kvpack.errors import ConfigError, ShapeError, UnsupportedModelError
from kvpack.quant.packing import packed_row_bytes

# Layer types whose cache is plain per-head keys/values, and how kvpack stores them.
_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
_NO_CACHE_TYPES = ("dummy", "moe", "mlp")
# Config fields of architectures whose cache is not plain per-head K/V.
_LATENT_ATTENTION_FIELDS = ("kv_lora_rank",)

LayerPlan = list[tuple[str, int | None]]
"""Per decoder layer: ("full_attention", None), ("sliding_attention" or "chunked_attention", window) or
("dummy", None) for a layer that caches nothing."""


def layer_plan(config: PretrainedConfig) -> LayerPlan:
    """(layer type, sliding window or None) for each decoder layer, as transformers' DynamicCache builds it.

    Raises UnsupportedModelError for models whose state is not per-head keys/values (latent attention, recurrent or
    linear-attention layers)."""
    text = config.get_text_config(decoder=True)
    model_type = getattr(text, "model_type", type(text).__name__)
    for field in _LATENT_ATTENTION_FIELDS:
        if getattr(text, field, None):
            raise UnsupportedModelError(
                f"{model_type}: multi-head latent attention caches a compressed latent, not per-head keys/values; "
                "kvpack does not support this architecture: use transformers' own cache (the default) with it."
            )
    if getattr(text, "num_attention_heads", None) is None:
        raise UnsupportedModelError(
            f"{model_type}: the model has no attention heads (a recurrent or state-space model); its state is not a "
            "key/value cache, so kvpack cannot hold it: use the model's own cache."
        )
    n_layers = text.num_hidden_layers
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        sliding = getattr(text, "sliding_window", None)
        chunk = getattr(text, "attention_chunk_size", None)
        default = "sliding_attention" if sliding else "chunked_attention" if chunk else "full_attention"
        layer_types = [default] * n_layers
    plan: LayerPlan = []
    for layer_type in layer_types:
        if layer_type == "full_attention":
            plan.append((layer_type, None))
        elif layer_type in _SLIDING_TYPES:
            window = text.sliding_window if layer_type == "sliding_attention" else text.attention_chunk_size
            plan.append((layer_type, int(window)))
        elif layer_type in _NO_CACHE_TYPES:
            plan.append(("dummy", None))
        else:
            raise UnsupportedModelError(
                f"{model_type}: layer type {layer_type!r} does not cache plain per-head keys/values (linear, hybrid, "
                "indexed or compressed attention); kvpack refuses it rather than half-support it: use transformers' "
                "own cache (the default) with this model."
            )
    if getattr(text, "kv_sharing_modes", None) is not None:
        plan = [
            ("dummy", None) if mode == "reuse" else entry
            for entry, mode in zip(plan, text.kv_sharing_modes, strict=True)
        ]
    return plan


@dataclass(frozen=True)
class CacheShape:
    """The shape of a model's KV cache, read from its config.

    architecture: the text config's `model_type`. plan: `layer_plan(config)`. attention_heads: query heads.
    kv_heads: cached heads per layer. head_dim: channels per cached head (keys and values alike)."""

    architecture: str
    plan: tuple[tuple[str, int | None], ...]
    attention_heads: int
    kv_heads: int
    head_dim: int

    @property
    def layers(self) -> int:
        """Decoder layers, including those that cache nothing."""
        return len(self.plan)


def cache_shape(config: PretrainedConfig | Any) -> CacheShape:
    """The `CacheShape` of a model config (or of a model: its `.config`). Raises as `layer_plan` does."""
    config = getattr(config, "config", config)
    plan = layer_plan(config)
    text = config.get_text_config(decoder=True)
    heads = int(text.num_attention_heads)
    return CacheShape(
        architecture=str(getattr(text, "model_type", type(text).__name__)),
        plan=tuple(plan),
        attention_heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
    )


Count = TypeVar("Count", int, torch.Tensor)
_PARAM_BYTES = torch.float16.itemsize  # scales, zeros and outlier values are float16


def flushed_tokens(stored: Count, config: CacheConfig) -> Count:
    """Tokens packed out of `stored` tokens held after the sinks (an int, or a tensor of counts elementwise).

    The flush rule: once the residual window holds `residual + block_tokens` tokens, its oldest whole blocks are
    quantized, keeping at least `residual` tokens exact; so of `stored` tokens, every whole block beyond the
    newest `residual` is packed (no token early, none late)."""
    block = config.block_tokens
    beyond = stored - config.residual
    beyond = beyond.clamp(min=0) if isinstance(beyond, torch.Tensor) else max(beyond, 0)
    return beyond // block * block


def dropped_tokens(stored: int, packed: int, sliding_window: int, config: CacheConfig) -> int:
    """Packed tokens a sliding-window layer forgets when it holds `stored` tokens, `packed` of them packed: whole
    blocks older than the window plus a margin of `residual + block_tokens` tokens (which keeps a rollback of the
    residual window exact), never more than are packed."""
    block = config.block_tokens
    excess = stored - (sliding_window - 1 + config.residual + block)
    return min(max(excess, 0) // block * block, packed)


def exact_capacity(config: CacheConfig) -> int:
    """The most tokens a layer's exact buffer holds: the sinks, the residual window, and one block that fills
    before it is packed. The buffer grows to this as it fills (`PackedLayer`), never beyond."""
    return config.sinks + config.residual + config.block_tokens


def packed_bytes(spec: QuantSpec, tokens: int, head_dim: int) -> int:
    """Bytes of one (batch, head) row of a `PackedBuffer` holding exactly `tokens` tokens (codes, scales, zeros, and
    with outliers their float16 values and uint8 positions)."""
    if spec.axis == "channel":  # one row of `group_size` codes per channel per block of tokens
        units, code_bytes, params = (
            tokens // spec.group_size,
            head_dim * packed_row_bytes(spec.group_size, spec.bits),
            head_dim,
        )
    else:  # one row of `head_dim` codes per token
        units, code_bytes, params = tokens, packed_row_bytes(head_dim, spec.bits), head_dim // spec.group_size
    return units * (code_bytes + params * (2 * _PARAM_BYTES + spec.outliers * (_PARAM_BYTES + 1)))


def check_head_dims(config: CacheConfig, key_dim: int, value_dim: int, where: str = "") -> None:
    """Raise ShapeError when a tensor grouped along channels (`axis="token"`) has a head dim its group size does not
    divide, with advice; `where` prefixes the message (e.g. the layer)."""
    for name, spec, dim in (("key", config.key, key_dim), ("value", config.value, value_dim)):
        if spec.axis == "token" and dim % spec.group_size:
            fitting = [g for g in (128, 64, 32, 16) if dim % g == 0]
            if fitting:
                advice = f"choose a group size that divides {dim} (e.g. '-g{fitting[0]}')."
            else:
                flag = "-vc" if name == "value" else "drop '-kt'"
                advice = f"no supported group size divides {dim}: quantize the {name}s per channel instead ('{flag}')."
            raise ShapeError(
                f"{where}{name} head_dim {dim} is not divisible by the {name} group size {spec.group_size}; {advice}"
            )


# The context assumed for a model whose config does not state one (max_position_embeddings).
FALLBACK_CONTEXT_LIMIT = 1 << 17


def context_limit(config: PretrainedConfig) -> int:
    """The most tokens a sequence of this model holds: its `max_position_embeddings`, or `FALLBACK_CONTEXT_LIMIT`."""
    text = config.get_text_config(decoder=True)
    return int(getattr(text, "max_position_embeddings", None) or FALLBACK_CONTEXT_LIMIT)


def check_exact_tokens(cache_config: CacheConfig, limit: int) -> None:
    """Refuse sinks or a residual window longer than `limit` tokens (the model's context): they could never fill,
    and a spec such as `k4v4-s999999` is a typo far more often than an intent."""
    if cache_config.sinks > limit or cache_config.residual > limit:
        raise ConfigError(
            f"cache config {cache_config.spec}: {cache_config.sinks} sinks and a residual window of "
            f"{cache_config.residual} tokens, but the model holds at most {limit} tokens (its context): use '-s<n>' "
            f"and '-r<n>' of at most {limit} (defaults: the preset's sinks, '-r128')."
        )
