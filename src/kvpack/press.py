"""Token pruning and packing together: a kvpress press prunes a prefill, kvpack packs what it kept.

kvpress (NVIDIA) prunes the KV cache during prefill with "presses" (SnapKV, ExpectedAttention, Knorm, ...): a forward
hook after each attention layer scores the tokens the layer just cached and keeps the best. kvpack packs a cache to
2-8 bits. The two multiply (half the tokens in a 4.5-bit cache is ~7x less than float16) if the press sees the layer's
exact keys and values, before anything is quantized, and kvpack then packs the survivors once:

    >>> from kvpress import SnapKVPress
    >>> press = PackAfterPress(SnapKVPress(compression_ratio=0.5))
    >>> cache = KVPackCache(model, "k4v4")
    >>> with press(model):
    ...     model.model(input_ids=context_ids, cache=cache)    # prefill: pruned, then packed
    >>> # or through kvpress's pipeline: pipe(context, question=q, press=press, cache=cache)

`PackAfterPress` wraps a press. Before a layer's attention runs on an empty `PackedLayer`, it asks the layer to
hold the prefill exactly (`PackedLayer.hold_prefill`); after the attention, it gives the held keys/values to the
press's own `compress` and stores what the press returns (`release_prefill`), packed as a prefill of those tokens
would be: sinks, whole blocks, and the newest `residual` of them exact. One layer's prefill is held exactly at a
time. With a transformers `DynamicCache` the wrapper prunes the layer's tensors as kvpress does, so the same object
measures "the press alone". Sliding-window layers (Gemma 3's local layers) are not pruned, as in kvpress.

The kvpress pipeline gives the answer's tokens positions after the *original* context and drops each answer from
the cache by assigning a prefix slice to `layer.keys` / `layer.values`, which `PackedLayer` turns into a crop: that
works while a question plus its answer fit in the residual window (tokens that were packed cannot be removed; a
clear error says so). kvpress declares `transformers<5.3`, which kvpack does not admit: install it without its pins
(`pip install "kvpack[press]"` then `pip install --no-deps kvpress==0.5.5`, as `scripts/setup.sh --press` does).
Its presses call the model's modules directly and work on the transformers releases kvpack admits; its own hooks
(an unwrapped press) read arguments that transformers 5.25 renamed, so use them through this wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvpack.cache.cache import KVPackCache
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer
from kvpack.errors import ConfigError

KVPRESS_VERSION = "0.5.5"
INSTALL_HINT = f'pip install "kvpack[press]" && pip install --no-deps kvpress=={KVPRESS_VERSION}'

# Presses that act during decoding, change positions or restore tokens: the pipeline branches on their types (which
# a wrapper hides) or they need more than the keys/values of one prefill.
REFUSED_PRESSES = (
    "DecodingPress",
    "PrefillDecodingPress",
    "KeyRerotationPress",
    "FinchPress",
    "DMSPress",
    "RestoreKVPress",
    "ThinKPress",
)


def require_kvpress() -> Any:
    """The `kvpress` module; raises ConfigError saying how to install it when it is absent."""
    try:
        import kvpress
    except ImportError as exc:
        raise ConfigError(
            f"kvpress is not installed (needed to prune the cache with a press): {INSTALL_HINT} (kvpress declares "
            "transformers<5.3; kvpack uses its presses with newer transformers, so it is installed without its pins)."
        ) from exc
    return kvpress


@dataclass
class PackAfterPress:
    """A kvpress prefill press whose survivors kvpack packs; use it where the press would go (see the module doc).

    press: a kvpress press that prunes at prefill (e.g. `SnapKVPress`, `ExpectedAttentionPress`, `KnormPress`,
    `StreamingLLMPress`, `TOVAPress`); presses that act during decoding, re-rotate keys or restore tokens raise
    ConfigError.
    """

    press: Any
    _prefilling: set[int] = field(default_factory=set, init=False, repr=False)  # attention modules (DynamicCache)

    def __post_init__(self) -> None:
        kvpress = require_kvpress()
        if not isinstance(self.press, kvpress.BasePress):
            raise ConfigError(f"PackAfterPress wraps a kvpress press, got {type(self.press).__name__}.")
        refused = [name for name in REFUSED_PRESSES if isinstance(self.press, getattr(kvpress, name, ()))]
        if refused:
            raise ConfigError(
                f"{type(self.press).__name__} is a {refused[0]}: it acts during decoding, moves positions or restores "
                "tokens, which a packed cache cannot follow; use a press that prunes at prefill (SnapKVPress, "
                "ExpectedAttentionPress, KnormPress, ...)."
            )

    @property
    def compression_ratio(self) -> float:
        """The wrapped press's fraction of tokens removed (kvpress's attribute)."""
        return float(getattr(self.press, "compression_ratio", 0.0))

    @contextlib.contextmanager
    def __call__(self, model: Any) -> Iterator[None]:
        """Prune (and pack) every prefill run on `model` inside the `with` block."""
        self.press.post_init_from_model(model)
        base = model.model if hasattr(model, "model") else model
        language_model = getattr(base, "language_model", base)
        hooks = []
        try:
            for layer in language_model.layers:
                attention = layer.self_attn
                attention.rotary_emb = language_model.rotary_emb  # some presses re-apply RoPE (as kvpress sets it)
                hooks.append(attention.register_forward_pre_hook(self._before, with_kwargs=True))
                hooks.append(attention.register_forward_hook(self._after, with_kwargs=True))
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = _cache_of(kwargs)
        if isinstance(cache, KVPackCache):
            layer: Any = cache.layers[module.layer_idx]
            if _prunable(layer) and not layer.is_initialized and not layer.holding:
                layer.hold_prefill()
        elif isinstance(cache, Cache):
            # transformers' DynamicCache may create its layers at their first update
            layer = cache.layers[module.layer_idx] if module.layer_idx < len(cache.layers) else None
            sliding = getattr(layer, "is_sliding", False) or getattr(module, "sliding_window", None) is not None
            if not sliding and (layer is None or layer.get_seq_length() == 0):
                self._prefilling.add(id(module))

    def _after(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        cache = _cache_of(kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(cache, KVPackCache):
            layer = cache.layers[module.layer_idx]
            if isinstance(layer, PackedLayer) and layer.holding and layer.held_keys is not None:
                assert layer.held_values is not None
                keys, values = self.prune(module, hidden_states, layer.held_keys, layer.held_values, attentions, kwargs)
                layer.release_prefill(keys, values)
        elif isinstance(cache, Cache) and id(module) in self._prefilling:
            self._prefilling.discard(id(module))
            layer = cache.layers[module.layer_idx]
            layer.keys, layer.values = self.prune(module, hidden_states, layer.keys, layer.values, attentions, kwargs)
        return output

    def prune(
        self, module: Any, hidden_states: Any, keys: Any, values: Any, attentions: Any, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the press keeps of `keys`/`values` `[batch, kv_heads, tokens, head_dim]`, in their original order.

        A scorer press (kvpress's `ScorerPress` with its own `compress`) keeps the `n_kept` best-scored tokens of
        each head in score order; here the same tokens are kept in position order, so that kvpack's exact sinks are
        the oldest kept tokens and its exact residual window the newest (attention itself does not depend on the
        order). Other presses' `compress` is used as it is.
        """
        kvpress = require_kvpress()
        press = self.press
        if not isinstance(press, kvpress.ScorerPress) or type(press).compress is not kvpress.ScorerPress.compress:
            return press.compress(module, hidden_states, keys, values, attentions, kwargs)
        if press.compression_ratio == 0:
            return keys, values
        scores = press.score(module, hidden_states, keys, values, attentions, kwargs)
        kept = kvpress.utils.compute_n_kept(keys.shape[2], press.compression_ratio)
        indices = scores.topk(kept, dim=-1).indices.sort(dim=-1).values
        indices = indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()


def _cache_of(kwargs: dict[str, Any]) -> Any:
    """The cache an attention module was called with (`cache=` from transformers 5.25, `past_key_values=` before)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _prunable(layer: Any) -> bool:
    return isinstance(layer, PackedLayer) and not isinstance(layer, PackedSlidingLayer)
