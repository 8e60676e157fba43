"""`KVPackCache`: a transformers `Cache` whose layers store keys and values packed."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DummyLayer

from kvpack.attention.registry import ATTENTION_NAME
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer
from kvpack.config import DEFAULT_PRESET, CacheConfig, as_config
from kvpack.errors import ConfigError, UnsupportedModelError

# Layer types whose cache is plain per-head keys/values, and how kvpack stores them.
_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
_NO_CACHE_TYPES = ("dummy", "moe", "mlp")
# Config fields of architectures whose cache is not plain per-head K/V.
_LATENT_ATTENTION_FIELDS = ("kv_lora_rank",)


def _layer_plan(config: PretrainedConfig) -> list[tuple[str, int | None]]:
    """(layer type, sliding window or None) for each decoder layer, as transformers' DynamicCache builds it."""
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
    plan: list[tuple[str, int | None]] = []
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


class KVPackCache(Cache):
    """A packed, quantized KV cache for Hugging Face `transformers` generation.

    >>> cache = KVPackCache(model.config)                    # the `balanced` preset; or "k2v2", a CacheConfig ...
    >>> out = model.generate(**inputs, cache=cache)     # past_key_values=cache before transformers 5.25
    >>> cache.nbytes(), cache.fp16_nbytes()

    One `PackedLayer` per full-attention layer and one `PackedSlidingLayer` per sliding-window layer, so
    models such as Gemma 3 keep transformers' windowed behaviour. Models whose cache is not plain
    per-head keys/values raise `UnsupportedModelError`.

    A cache that holds a reusable prefix (a document, a system prompt) can be saved and loaded instead of
    recomputing the prefill: `cache.save(path, model, token_ids, tokenizer)`, `KVPackCache.load(path, model)`
    (see `kvpack.cache.persist`; `kvpack.prefix_cache` builds one).
    """

    prefix_ids: torch.Tensor | None
    """`[batch, tokens]` (CPU) ids of the first tokens the cache holds, when known: set by `load` and
    `kvpack.prefix_cache`, used by `save`. Generation appends to the cache, not to these."""
    prefill_s: float | None
    """Seconds the prefill of `prefix_ids` took (measured by `kvpack.prefix_cache`, or read from the file)."""

    def __init__(
        self,
        config: PretrainedConfig | Any,
        cache_config: CacheConfig | str | os.PathLike[str] = DEFAULT_PRESET,
        backend: str = "auto",
    ):
        """config: the model's config (or the model itself); cache_config: a `CacheConfig`, a preset name (default
        `balanced`), a spec string or a calibrated profile's path (see `kvpack.config.as_config`). Per-layer bits
        (`CacheConfig.layer_bits`) must name every layer of the model (else ConfigError); each layer is built from
        `cache_config.for_layer(idx)`.

        backend: the attention backend when the model runs kvpack's attention (`kvpack.use_kvpack_attention`):
        `auto`, `torch`, `cpu` or `numba` (see `kvpack.attention`); `dense` dequantizes in the cache instead.
        With `dense`, or with any other attention implementation, `update` returns dense keys and values and
        the model's own attention reads them.
        """
        from kvpack.attention.registry import check_backend

        if not isinstance(config, PretrainedConfig) and isinstance(getattr(config, "config", None), PretrainedConfig):
            config = config.config
        from kvpack.calibrate import is_profile_path, load_profile

        if is_profile_path(cache_config):
            profile = load_profile(cache_config)  # type: ignore[arg-type]
            profile.check_model(config)
            self.cache_config = profile.config
        else:
            self.cache_config = as_config(cache_config)
        check_exact_tokens(self.cache_config, context_limit(config))
        self.backend = check_backend(backend)
        # Read at every update (cheap), so switching the model's attention implementation is always honoured.
        self._text_config = config.get_text_config(decoder=True)
        plan = _layer_plan(config)
        per_layer = self.cache_config.layer_bits
        if per_layer and len(per_layer) != len(plan):
            raise ConfigError(
                f"the cache config has per-layer bits for {len(per_layer)} layers, but this model has {len(plan)} "
                "layers: a calibrated profile fits only the model it was made for "
                "(run `kvpack calibrate` for this one)."
            )
        layers: list[Any] = []
        for idx, (layer_type, window) in enumerate(plan):
            layer_config = self.cache_config.for_layer(idx)
            if layer_type == "dummy":
                layers.append(DummyLayer())
            elif window is not None:
                layers.append(PackedSlidingLayer(layer_config, sliding_window=window, layer_idx=idx))
            else:
                layers.append(PackedLayer(layer_config, layer_idx=idx))
        super().__init__(layers=layers)
        self.prefix_ids = None
        self.prefill_s = None

    def __repr__(self) -> str:
        return f"KVPackCache({self.cache_config.spec}, layers={len(self.layers)}, tokens={self.get_seq_length()})"

    def _packed_layers(self) -> list[PackedLayer]:
        return [layer for layer in self.layers if isinstance(layer, PackedLayer)]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values; return what the model's attention implementation reads.

        With kvpack's attention (the text config's implementation, checked at every call so that switching the
        model's implementation is always honoured), packed views for the fused path; otherwise dense tensors.
        """
        layer = self.layers[layer_idx]
        fused = self.backend != "dense" and self._text_config._attn_implementation == ATTENTION_NAME
        if fused and isinstance(layer, PackedLayer):
            return layer.fused_update(key_states, value_states, self.backend)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens from every layer, or raise before changing any (see `PackedLayer.crop`)."""
        for layer in self._packed_layers():
            layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def save(
        self,
        path: str | os.PathLike[str],
        model: Any,
        token_ids: Any = None,
        tokenizer: Any = None,
        prefill_s: float | None = None,
        name: str | None = None,
    ) -> None:
        """Write the cache to `path` (safetensors + a JSON header; by convention `*.kvpc`), to load it later.

        model: the model that filled the cache (its fingerprint is saved, and checked at load). token_ids: the ids
        of every token the cache holds, `[batch, tokens]` (default: `prefix_ids`). tokenizer: saves its hash too,
        so that `load` with a tokenizer refuses another one. prefill_s: the prefill's seconds, shown by `kvpack
        cache info` (default: `prefill_s` with `prefix_ids`). name: a label for the model (default: its path).
        Only the valid tokens are written: packed codes, scales and zeros, the exact residual window and sinks.
        The file is written to a temporary name and renamed, so `path` never holds a partial file.
        """
        from kvpack.cache.persist import save_cache

        save_cache(self, path, model, token_ids, tokenizer, prefill_s, name)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model: Any, tokenizer: Any = None, backend: str = "auto"
    ) -> KVPackCache:
        """A cache read from a file that `save` wrote, on `model`'s devices (each layer where its weights are).

        The loaded cache is bit for bit the saved one: generation from it gives exactly what generation after a
        fresh prefill of the same tokens with the same config gives. Its `prefix_ids` are the saved token ids;
        append new tokens after them (`torch.cat([cache.prefix_ids, new_ids], dim=1)` as `generate`'s input).
        Generation extends the cache: to reuse a prefix for several prompts, load it again or `copy.deepcopy` it.
        Raises a `CacheFileError` subclass, whose `check` names the failed check, for a file that is missing,
        truncated, corrupt or modified (checksum), of another schema version, or built for another model (its
        architecture, layer shapes, dtype, config or sampled weights differ) or tokenizer (checked when given).
        """
        from kvpack.cache.persist import load_cache

        return load_cache(path, model, tokenizer, backend)

    def nbytes(self) -> int:
        """Exact bytes the cache holds: codes, scales, zeros, sinks, residual buffers and unused capacity."""
        return sum(layer.nbytes() for layer in self._packed_layers())

    def fp16_nbytes(self) -> int:
        """Bytes a float16 `DynamicCache` would hold for the same tokens (for compression ratios)."""
        return sum(layer.fp16_nbytes() for layer in self._packed_layers())
