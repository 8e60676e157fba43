"""One name space for every cache a benchmark or evaluation compares: kvpack specs, the full-precision cache, and peers.

    fp                           transformers' DynamicCache (the model's dtype)
    fp-prealloc                  a full-precision cache in preallocated buffers (no copy of the whole cache per
                                 step, unlike DynamicCache's torch.cat): the strongest fp baseline for speed
    k4v4, k8v8-g64-r128, ...     kvpack (see kvpack.config)
    profile.json[@backend]       a calibrated per-layer profile (`kvpack calibrate`), named `profile:<file stem>`
    auto-4.5[@backend], ...      options and per-layer bits chosen for the model within the budget (calibrated once,
                                 then read from the profile store: `kvpack.cache.auto`; `resolve_auto`)
    k4v4@cpu, k4v4@dense, ...    kvpack with an attention backend (auto, torch, cpu, numba; dense = dequantize in
                                 the cache and let the model's attention read it); default auto
    quanto-int4, quanto-int2     transformers' QuantizedCache, optimum-quanto backend
    hqq-int8, hqq-int4-axis1     transformers' QuantizedCache, HQQ backend (axis 0 by default, as transformers)
    ...[-g<group>][-r<residual>] group size (default 64) and residual length (default 128) of the peers
    tqai-k4v4[-r<n>][-s<n>]      tqai's TurboQuant cache (random rotation + Lloyd-Max levels for the rotated
                                 coordinates + a float16 norm per vector); -r: its exact window of the newest tokens
                                 (its "residual" strategy; default none), -s: exact sink tokens (default none)

Peers need their packages (the `peers` extra); asking for one that is missing says which to install.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvpack.attention.registry import check_backend
from kvpack.cache.auto import auto_budget
from kvpack.compat import cache_kwargs
from kvpack.config import CacheConfig, parse_spec
from kvpack.errors import ConfigError, KVPackError
from kvpack.profile import is_profile_path, resolve_config

_PEER = re.compile(r"^(quanto|hqq)-int(\d)((?:-(?:g\d+|r\d+|axis[01]))*)$")
_TQAI = re.compile(r"^tqai-k(\d)v(\d)((?:-(?:r\d+|s\d+))*)$")
_PEER_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq"), "tqai": ("tqai", "tqai")}


@dataclass
class CacheSpec:
    """A parsed cache name: what to build, and the caveats a fair report must state."""

    name: str
    kind: str  # "fp", "kvpack" or "peer"
    notes: list[str] = field(default_factory=list)
    peer: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    profile: str | None = None  # a profile's path (kind "kvpack"); `name` is then its short label
    auto: float | None = None  # the budget of an `auto-<bits>` spec; its `profile` is set by `resolve_auto`

    @property
    def feed_first_tokens_together(self) -> int:
        """Tokens to feed in the first call of a streamed run (a workaround some peers need)."""
        return 2 if self.peer.get("backend") == "hqq" else 1

    @property
    def source(self) -> str:
        """What `KVPackCache` takes (kind "kvpack"): the profile's path, or the spec without its `@backend`; a path,
        not the profile's config, so that the cache checks the profile was made for its model."""
        return self.profile or self.name.partition("@")[0]

    def config(self) -> CacheConfig:
        """The kvpack cache config (kind "kvpack" only)."""
        return resolve_config(self.source)

    def bits_per_value(self, head_dim: int | None = None) -> float | None:
        """Nominal stored bits per cached value (codes + metadata) of a kvpack cache, and of tqai's given the head
        dim (codes + a float16 norm per vector); None for the others (a peer's metadata dtype is its own:
        `cache_nbytes` counts its bytes instead of assuming them)."""
        if self.kind == "kvpack":
            return self.config().bits_per_value
        if self.peer.get("backend") == "tqai" and head_dim:
            return (self.peer["bits_k"] + self.peer["bits_v"]) / 2 + 16 / head_dim
        return None


def parse_cache_name(name: str) -> CacheSpec:
    """Parse `fp`, a kvpack spec or a peer name; raises ConfigError listing the accepted forms."""
    name = name.strip()
    if name in ("fp", "fp-prealloc"):
        return CacheSpec(name=name, kind=name)
    if peer := _PEER.match(name):
        backend, bits = peer.group(1), int(peer.group(2))
        options = dict(re.findall(r"-(g|r|axis)(\d+)", peer.group(3)))
        axis = int(options.get("axis", 0))
        settings = {"backend": backend, "nbits": bits, "q_group_size": int(options.get("g", 64))}
        settings.update(residual_length=int(options.get("r", 128)), axis_key=axis, axis_value=axis)
        spec = CacheSpec(name=name, kind="peer", peer=settings)
        if backend == "hqq":
            spec.notes.append(
                "first two tokens fed in one call: transformers' HQQ cache crashes on one token with an odd number "
                "of KV heads (shared/BASELINES.md)"
            )
        return spec
    if tqai := _TQAI.match(name):
        options = dict(re.findall(r"-([rs])(\d+)", tqai.group(3)))
        settings = {"backend": "tqai", "bits_k": int(tqai.group(1)), "bits_v": int(tqai.group(2))}
        settings.update(residual_length=int(options.get("r", 0)), sink_tokens=int(options.get("s", 0)))
        notes = [
            "tqai keeps a dequantized copy of every token it quantizes (in the model's dtype) and no codes: its "
            "bytes are what it holds, not its nominal bits (codes + a float16 norm per vector)"
        ]
        return CacheSpec(name=name, kind="peer", peer=settings, notes=notes)
    spec_text, _, backend = name.partition("@")
    if (budget := auto_budget(spec_text)) is not None:
        if backend:
            check_backend(backend)
        label = f"auto-{budget:g}" + (f"@{backend}" if backend and backend != "auto" else "")
        return CacheSpec(name=label, kind="kvpack", backend=backend or "auto", auto=budget)
    try:
        config = resolve_config(spec_text)
        if backend:
            check_backend(backend)
    except ConfigError as exc:
        raise ConfigError(
            f"unknown cache {name!r}: use 'fp', a kvpack spec (e.g. k4v4) or a peer "
            f"(quanto-int4, quanto-int2, hqq-int8, hqq-int4-axis1, ...[-g64][-r128]; tqai-k4v4[-r128][-s4]). ({exc})"
        ) from exc
    # A profile's spec holds two digits per layer: tables name it by its file instead (the JSON keeps the path).
    profile = spec_text if is_profile_path(spec_text) else None
    label = f"profile:{Path(spec_text).stem}" if profile else config.spec
    if backend and backend != "auto":
        return CacheSpec(name=f"{label}@{backend}", kind="kvpack", backend=backend, profile=profile)
    return CacheSpec(name=label, kind="kvpack", profile=profile)


def resolve_auto(specs: Iterable[CacheSpec], model: Any, tokenizer: Any) -> None:
    """Give each `auto-<bits>` spec of `specs` its profile for `model`: calibrated now, or read from the store."""
    from kvpack.cache.auto import auto_profile

    for spec in specs:
        if spec.auto is not None and spec.profile is None:
            spec.profile = str(auto_profile(model, spec.auto, tokenizer).path)


def uniform_spec(spec: str) -> CacheConfig:
    """The config of a spec string without per-layer bits (what a benchmark of one layout measures); raises
    ConfigError for a bad spec or one with per-layer bits."""
    config = parse_spec(spec)
    if config.layer_bits:
        raise ConfigError(f"{spec}: per-layer bits (-l...) are not supported by this benchmark; give a uniform spec.")
    return config


def parse_compared(names: Iterable[str]) -> list[CacheSpec]:
    """`parse_cache_name` of each name, with `fp` (the reference of a comparison) put first when it is not there;
    raises KVPackError naming what to install for a peer whose package is missing (before any model loads)."""
    specs = [parse_cache_name(name) for name in names]
    if not specs or specs[0].name != "fp":
        specs.insert(0, parse_cache_name("fp"))
    for spec in specs:
        require_packages(spec)
    return specs


def load_timed_model(
    model_name: str | None, backends: Iterable[str], *, dtype: str, device: str, weights: str = "fp"
) -> tuple[Any, Any]:
    """The model and tokenizer (`kvpack.models.load_model`) made ready to time caches on: attention goes through
    kvpack's (kvpack caches take the fused path; fp and peer caches still go through SDPA), and each of `backends`
    is prepared, so that a kernel compiled on first use does not land in a timed step."""
    from kvpack.models import load_model

    model, tokenizer = load_model(model_name, dtype=dtype, device=device, weights=weights)
    return prepare_timed_model(model, backends), tokenizer


def prepare_timed_model(model: Any, backends: Iterable[str]) -> Any:
    """`model` with kvpack's attention and each of `backends` prepared (see `load_timed_model`); returns it."""
    from kvpack.attention import use_kvpack_attention
    from kvpack.attention.registry import prepare

    use_kvpack_attention(model)
    for backend in dict.fromkeys(backends):
        prepare(backend)
    return model


def make_cache(spec: CacheSpec, model_config: Any) -> Any:
    """A fresh, empty cache of kind `spec` for a model with `model_config`."""
    from transformers import DynamicCache

    if spec.kind == "fp":
        return DynamicCache(config=model_config)
    if spec.kind == "fp-prealloc":
        return PreallocatedCache(model_config)
    if spec.kind == "kvpack":
        from kvpack.cache import KVPackCache

        return KVPackCache(model_config, spec.source, backend=spec.backend)
    require_packages(spec)
    if spec.peer["backend"] == "tqai":
        from tqai.cache.hf import TurboQuantDynamicCache
        from tqai.config import TurboQuantConfig

        class TqaiCache(TurboQuantDynamicCache):
            """tqai's cache, its `update` taking the keyword arguments transformers 5.25 adds (tqai 0.6 takes none)."""

            def update(self, key_states: Any, value_states: Any, layer_idx: int, cache_kwargs: Any = None,
                       **_: Any) -> Any:  # fmt: skip
                return super().update(key_states, value_states, layer_idx, cache_kwargs)

            def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
                """Every token it has seen and the new ones (tqai keeps its tokens outside `self.layers`, where
                transformers looks for them: it would size the masks as if the cache were empty, and a sliding-window
                layer would see every token). It returns every token to every layer; the mask slides the window."""
                return self.get_seq_length(layer_idx) + query_length, 0

        peer = spec.peer
        strategy = {"cache_strategy": "residual", "residual_window": peer["residual_length"]}
        settings = {"bits_k": peer["bits_k"], "bits_v": peer["bits_v"], "sink_tokens": peer["sink_tokens"]}
        # tqai.patch(model, bits_k, bits_v, ...) builds this cache (seed 42); its own default strategy keeps no
        # exact window ("incremental").
        return TqaiCache(
            TurboQuantConfig(**settings, seed=42, backend="torch", **(strategy if peer["residual_length"] else {}))
        )
    from transformers import QuantizedCache

    return QuantizedCache(config=model_config, **spec.peer)


def prefill(model: Any, ids: torch.Tensor, spec: CacheSpec, cache: Any) -> None:
    """Run `ids` `[batch, n]` through `model` into `cache` (of kind `spec`), keeping only the last logits; the first
    call takes `spec.feed_first_tokens_together` tokens (a peer's workaround), the next one the rest."""
    first = spec.feed_first_tokens_together
    with torch.no_grad():
        for part in (ids[:, :first], ids[:, first:]):
            if part.shape[1]:
                model(part, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)


class PreallocatedLayer(DynamicLayer):
    """A full-precision layer that writes new tokens into preallocated buffers and returns views of them.

    Capacity doubles when full, so a decode step copies only the new token (DynamicCache concatenates the whole
    cache at every step). Views are what a strong fp implementation would hand to attention.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.key_buffer.shape[2]:
            capacity = max(end, 2 * self.key_buffer.shape[2], 256)
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                grown = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                grown[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, grown)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


class PreallocatedCache(Cache):
    """`fp-prealloc`: one `PreallocatedLayer` per layer (full-attention models only)."""

    def __init__(self, model_config: Any):
        text = model_config.get_text_config(decoder=True)
        super().__init__(layers=[PreallocatedLayer() for _ in range(text.num_hidden_layers)])


def require_packages(spec: CacheSpec) -> None:
    """Raise KVPackError naming what to install if the cache `spec` needs a package that is missing."""
    if spec.kind != "peer":
        return
    module, package = _PEER_PACKAGES[spec.peer["backend"]]
    top = importlib.util.find_spec(module.split(".")[0])
    if top is None or importlib.util.find_spec(module) is None:
        raise KVPackError(
            f"the peer cache {spec.name!r} needs {package}: pip install '{package}' (or pip install 'kvpack[peers]')."
        )


def cache_nbytes(cache: Any) -> int:
    """Bytes of every tensor a cache holds, found by walking its layers (shared storage counted once).

    kvpack caches report their own exact count; for other caches this walks tensor attributes, containers
    and tensor subclasses (quanto's packed tensors expose their inner tensors through `__tensor_flatten__`).
    """
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    held: dict[tuple[int, int], int] = {}  # bytes by storage (address, size): shared storage counted once

    def visit(obj: Any, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(obj, torch.Tensor):
            flatten = getattr(type(obj), "__tensor_flatten__", None)
            if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
                inner_names, _ = flatten(obj)
                for inner in inner_names:
                    visit(getattr(obj, inner), depth + 1)
                return
            storage = obj.untyped_storage()
            held[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
            return
        if isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, list | tuple):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                visit(value, depth + 1)

    visit(cache, 0)  # its layers, and what a cache keeps beside them (tqai keeps its buffers in dicts of its own)
    return sum(held.values())
