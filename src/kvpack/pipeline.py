"""transformers' text-generation pipeline with a packed cache: a fresh `KVPackCache` for each `generate` call.

A cache passed to a pipeline call (`pipe(text, cache=KVPackCache(model))`) reaches `generate` as a generation
option, which is right for one prompt; for a list of prompts the pipeline passes that one cache to every prompt's
(or batch's) `generate`, and each continues from the tokens the previous one left in it: wrong output, without an
error. `KVPackTextGenerationPipeline` makes a fresh cache per `generate` call instead (one per batch with
`batch_size`), and refuses a cache passed to it.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TextGenerationPipeline

from kvpack.attention.registry import check_backend
from kvpack.cache.auto import auto_budget, auto_profile
from kvpack.cache.cache import KVPackCache
from kvpack.compat import cache_keyword
from kvpack.config import DEFAULT_PRESET, CacheConfig
from kvpack.errors import KVPackError
from kvpack.profile import resolve_config


class KVPackTextGenerationPipeline(TextGenerationPipeline):
    """A `TextGenerationPipeline` whose every `generate` call gets a new `KVPackCache(model, cache_config)`.

    >>> pipe = pipeline("text-generation", model=model, tokenizer=tokenizer,
    ...                 pipeline_class=KVPackTextGenerationPipeline, cache_config="k4v4")
    >>> pipe(["The capital of France is", "Once upon a time"], batch_size=2, max_new_tokens=32, do_sample=False)

    cache_config: a preset, spec, `CacheConfig`, profile path or `auto-<bits>` (default the `balanced` preset);
    backend: the attention backend of the caches (see `KVPackCache`). Both are checked when the pipeline is made
    (ConfigError); an `auto-<bits>` spec is resolved then too (calibrated once per model).
    """

    def __init__(
        self,
        *args: Any,
        cache_config: CacheConfig | str | os.PathLike[str] = DEFAULT_PRESET,
        backend: str = "auto",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        budget = auto_budget(cache_config)
        if budget is not None:  # chosen for this model once (calibrated, or read from the profile store)
            cache_config = auto_profile(self.model, budget, self.tokenizer).config
        self.cache_config = resolve_config(cache_config, self.model.config)
        self.backend = check_backend(backend)

    # transformers' own override already renames the base class's parameters: no signature fits both.
    def _forward(self, model_inputs: Any, **generate_kwargs: Any) -> Any:  # type: ignore[override]
        for name in ("cache", "past_key_values"):
            if generate_kwargs.get(name) is not None:
                raise KVPackError(
                    f"{type(self).__name__} makes a fresh KVPackCache ({self.cache_config.spec}) for each generate "
                    f"call; pass no {name}= (one cache would be shared by every prompt of a call). Choose the "
                    "cache with cache_config= when making the pipeline."
                )
        cache = KVPackCache(self.model, self.cache_config, backend=self.backend)
        return super()._forward(model_inputs, **generate_kwargs, **{cache_keyword(self.model): cache})
