"""What differs between the transformers releases kvpack supports, decided in one place.

transformers 5.25 renamed the cache argument of models' `forward` and of `generate` from `past_key_values` to
`cache` (the old name warns, and goes in 5.40 for `forward`, 6.0 for `generate`). kvpack passes whichever name
the model at hand takes, so it runs without deprecation warnings on every release it supports:

    model(ids, **cache_kwargs(model, cache))
    model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=32)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable
from typing import Any


@functools.cache
def _forward_takes_cache(model_type: Hashable) -> bool:
    forward = getattr(model_type, "forward", None)
    if forward is None:
        return False
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a forward inspect cannot read: the older spelling is accepted everywhere
        return False
    return "cache" in parameters


def cache_keyword(model: Any) -> str:
    """`cache` where `model`'s forward takes it (transformers >= 5.25), else `past_key_values`."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for `model(...)` and `model.generate(...)`, under the name `model` takes (see above)."""
    return {cache_keyword(model): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a forward or `generate` (with `return_dict_in_generate`) returned, under either release's name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values
