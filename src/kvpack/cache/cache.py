"""`KVPackCache`: a transformers `Cache` whose layers store keys and values packed."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DummyLayer

from kvpack.attention.registry import ATTENTION_NAME
from kvpack.cache.auto import auto_budget, auto_profile
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer
from kvpack.cache.plan import check_exact_tokens, context_limit, layer_plan
from kvpack.config import DEFAULT_PRESET, CacheConfig
from kvpack.errors import ConfigError
from kvpack.profile import resolve_config


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
        tokenizer: Any = None,
    ):
        """config: the model's config (or the model itself); cache_config: a `CacheConfig`, a preset name (default
        `balanced`), a spec string or a calibrated profile's path (see `kvpack.profile.resolve_config`). Per-layer bits
        (`CacheConfig.layer_bits`) must name every layer of the model (else ConfigError); each layer is built from
        `cache_config.for_layer(idx)`.

        `auto-<bits>` (e.g. `auto-4.5`): the options and per-layer bits chosen for this model within that budget on
        kvpack's calibration text, calibrated the first time (about a minute) and then read from the profile store
        (`kvpack.cache.auto`). It needs the model itself, and its tokenizer (`tokenizer`, else loaded from the
        model's folder).

        backend: the attention backend when the model runs kvpack's attention (`kvpack.use_kvpack_attention`):
        `auto`, `torch`, `cpu` or `numba` (see `kvpack.attention`); `dense` dequantizes in the cache instead.
        With `dense`, or with any other attention implementation, `update` returns dense keys and values and
        the model's own attention reads them.
        """
        from kvpack.attention.registry import check_backend

        model = config
        if not isinstance(config, PretrainedConfig) and isinstance(getattr(config, "config", None), PretrainedConfig):
            config = config.config
        budget = auto_budget(cache_config)
        if budget is not None:
            cache_config = auto_profile(model, budget, tokenizer).config
        self.cache_config = resolve_config(cache_config, config)
        check_exact_tokens(self.cache_config, context_limit(config))
        self.backend = check_backend(backend)
        # Read at every update (cheap), so switching the model's attention implementation is always honoured.
        self._text_config = config.get_text_config(decoder=True)
        plan = layer_plan(config)
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
