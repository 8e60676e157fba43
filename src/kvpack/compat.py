"""What differs between the transformers releases kvpack supports, decided in one place.

transformers 5.25 renamed the cache argument of models' `forward` and of `generate` from `past_key_values` to
`cache` (the old name warns, and goes in 5.40 for `forward`, 6.0 for `generate`). kvpack passes whichever name
the model at hand takes, so it runs without deprecation warnings on every release it supports:

    model(ids, **cache_kwargs(model, cache))
    model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=32)
"""

from __future__ import annotations

import inspect
from typing import Any

_KEYWORDS: dict[Any, str] = {}  # per model class: read once, not at every step


def _keyword(model_type: Any) -> str:
    try:
        parameters = inspect.signature(model_type.forward).parameters
    except (AttributeError, TypeError, ValueError):  # no forward inspect can read: the older name works everywhere
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: Any) -> str:
    """`cache` where `model`'s forward takes it (transformers >= 5.25), else `past_key_values`."""
    model_type = type(model)
    if model_type not in _KEYWORDS:
        _KEYWORDS[model_type] = _keyword(model_type)
    return _KEYWORDS[model_type]


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for `model(...)` and `model.generate(...)`, under the name `model` takes (see above)."""
    return {cache_keyword(model): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a forward or `generate` (with `return_dict_in_generate`) returned, under either release's name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values
