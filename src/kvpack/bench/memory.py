"""`kvpack memory`: exact KV-cache memory by batch size x sequence length for any model config, and a check of it.

The bytes a cache holds after a prefill of N tokens at batch B follow from the model config alone:

- `fp16`, `bf16`, `fp32`: transformers' `DynamicCache` in that dtype: keys and values of every token, per
  layer `B x kv_heads x tokens x head_dim x 2 x element size`; a sliding-window layer keeps the last
  `sliding_window - 1` tokens.
- a kvpack spec (`k4v4`, `k8v8-g64-r128-s4`, ...): `KVPackCache.nbytes()` after the prefill, computed from
  the layout of `kvpack.cache`: the sink and residual tokens the prefill left exact, in the model dtype (their
  buffer is allocated to fit them at the first fill and grows, at most to `sinks + residual + block_tokens`
  tokens, as decoding fills it), plus the packed blocks the prefill quantized (`PackedBuffer` allocates them
  exactly at the first fill): per-channel codes `head_dim x group x bits / 8` bytes per block
  of `group` tokens, per-token codes `head_dim x bits / 8` bytes per token, float16 scales and zeros.
  Layers that cache nothing (`DummyLayer`) hold 0 bytes.

The formula is exact (tests compare it with `nbytes()` of filled caches); `--measure` fills real caches for a
few cells and checks it against `nbytes()` and against the memory the process or device actually gained. Weight
bytes come from the model transformers builds from the config on the meta device (no memory allocated).

    kvpack memory                                     # the embedded default model's config, default grid
    kvpack memory --model benchmarks/configs/llama-2-7b.json --weights fp16,int8,int4 --budget-gib 24 --measure

`memory_table` returns the JSON-ready table, `measure_cells` the measurements, `to_markdown` renders both.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from kvpack.cache import plan
from kvpack.cache.plan import CacheShape
from kvpack.config import CacheConfig, parse_spec
from kvpack.errors import ConfigError, KVPackError, ModelNotFoundError, UnsupportedModelError
from kvpack.harness.process import libc, release_freed_memory, rss_bytes
from kvpack.harness.results import GIB, MIB, format_bytes, markdown_table, provenance_lines
from kvpack.models import DEFAULT_MODEL, default_model_file
from kvpack.models import DTYPES as MODEL_DTYPES
from kvpack.quant.packing import packed_row_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_CACHES = "fp16,k8v8,k4v4,k4v2,k2v2"
DEFAULT_BATCHES = "1,4,16,64"
DEFAULT_LENGTHS = "512,1024,2048,4096,8192,16384,32768,65536,131072"
DEFAULT_DTYPE = "float16"
FP_CACHES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_FORMATS = ("fp16", "int8", "int4")
INT4_GROUP = 64
# The tokens used to read off the marginal bytes per token: a multiple of every block size, far past any window.
_MARGINAL_TOKENS = 1 << 20
# The search for the max context stops here and calls the cache unbounded (e.g. an fp cache of window layers).
_MAX_SEARCH_TOKENS = 1 << 40

# --measure: the sample of cells, the cap on their size, and the process/device memory check.
MEASURE_BATCHES = (1, 4)
MEASURE_LENGTHS = (512, 2048, 8192)
MEASURE_MAX_GIB = 2.0
MEASURE_TOLERANCE = 0.02
# Below this, page rounding and allocator headers of each tensor (hundreds per cache, ~1-2 KiB each) approach the
# tolerance on small caches.
MEASURE_MIN_CHECKED_BYTES = 64 * MIB

WEIGHTS_METHOD = (
    "Parameters of the model transformers builds from the config (`AutoModelForCausalLM.from_config` on the meta "
    "device, so any architecture, nothing allocated), each tensor once (embeddings tied to lm_head count once). "
    "fp16: 2 bytes per parameter. int8: the weight matrices at 1 byte per weight plus one float16 scale per output "
    f"channel. int4: 0.5 byte per weight plus a float16 scale and zero per group of {INT4_GROUP} input channels. "
    "Weight matrices: the parameters of two or more dimensions (linear layers, mixture-of-experts tensors) other "
    "than embeddings, lm_head and convolutions; those, norms and biases stay float16 in every format (as GPTQ, AWQ "
    "and bitsandbytes checkpoints keep them). Activations, workspace and framework overhead are not counted."
)


# -- what the cache size depends on ---------------------------------------------------------------------------


def model_summary(config: PretrainedConfig) -> dict[str, Any]:
    """JSON-ready description of what a config's KV-cache size depends on: `cache_shape` (layer counts by type and
    window, KV heads, head_dim) and its max position embeddings (None if it states none). Raises as `cache_shape`."""
    shape = plan.cache_shape(config)
    counts = Counter(kind if window is None else f"{kind} (window {window})" for kind, window in shape.plan)
    max_positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return {
        "model_type": shape.architecture,
        "layers": shape.layers,
        "layer_types": dict(counts),
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": int(max_positions or 0) or None,
    }


@dataclass(frozen=True)
class CacheKind:
    """One column of the table: transformers' `DynamicCache` in `dtype`, or a kvpack cache with `config`."""

    name: str  # "fp16", "bf16", "fp32", or the canonical kvpack spec
    dtype: torch.dtype | None = None
    config: CacheConfig | None = None

    @property
    def is_kvpack(self) -> bool:
        return self.config is not None

    def describe(self, model_dtype: torch.dtype) -> str:
        """One line: what the cache stores."""
        if self.config is None:
            return f"transformers DynamicCache, keys and values in {_dtype_name(self.dtype)}"
        c, exact = self.config, _dtype_name(model_dtype)
        parts = [
            f"keys {c.key.bits}-bit per {c.key.axis} (groups of {c.key.group_size})",
            f"values {c.value.bits}-bit per {c.value.axis} (groups of {c.value.group_size})",
            f"residual window {c.residual} (+ up to {c.block_tokens}) tokens in {exact}",
        ]
        return ", ".join(parts + ([f"{c.sinks} sink tokens in {exact}"] if c.sinks else []))


def parse_cache(name: str | CacheConfig) -> CacheKind:
    """`fp16`, `bf16`, `fp32` (a `DynamicCache` in that dtype) or a kvpack spec / `CacheConfig`."""
    if isinstance(name, CacheConfig):
        return CacheKind(name=name.spec, config=name)
    key = name.strip().lower()
    if key in FP_CACHES:
        return CacheKind(name=key, dtype=FP_CACHES[key])
    try:
        config = parse_spec(key)
    except ConfigError as exc:
        raise ConfigError(
            f"unknown cache {name!r}: use fp16, bf16, fp32 or a kvpack spec such as k4v4 ({exc})"
        ) from exc
    if config.layer_bits:
        raise ConfigError(
            f"{name}: per-layer bits (-l...) are not supported by this benchmark (its byte model is per spec); "
            "give a uniform spec."
        )
    return CacheKind(name=config.spec, config=config)


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The model dtype named by `dtype` (a `torch.dtype` or a `MODEL_DTYPES` key); raises `ConfigError` otherwise."""
    if _dtype_name(dtype) not in MODEL_DTYPES:
        raise ConfigError(f"model dtype {dtype!r} is not supported; use one of {sorted(MODEL_DTYPES)}.")
    return MODEL_DTYPES[_dtype_name(dtype)]


# -- the exact formula ----------------------------------------------------------------------------------------


def _kvpack_row_bytes(
    config: CacheConfig, window: int | None, length: int, head_dim: int, element_size: int, full_window: bool = False
) -> int:
    """Bytes one (batch, kv head) row of a kvpack layer holds after a prefill of `length` tokens (`full_window`: with
    its exact buffer grown to its largest, `sinks + residual + block_tokens` tokens, as decoding leaves it)."""
    if window is not None:
        config = replace(config, sinks=0)  # as PackedSlidingLayer: the window moves past the sinks
    # The first `sinks` tokens go to the sinks; whole blocks of the rest are packed by the flush rule.
    sink_len = min(config.sinks, length)
    stored = length - sink_len
    flush = plan.flushed_tokens(stored, config)
    residual_len = stored - flush
    if window is not None:  # after a prefill the storage is reallocated to the blocks kept (`drop_oldest`)
        flush -= plan.dropped_tokens(stored, flush, window, config)
    # The record-past shadow block is empty (only assisted decoding turns it on).
    # PackedLayer._reserve_exact: one buffer, sized at the first fill to the exact tokens (the residual starts after
    # all `sinks` slots; it holds tokens only once they are full).
    dense_tokens = (config.sinks if residual_len else sink_len) + residual_len
    if full_window:
        dense_tokens = plan.exact_capacity(config)
    packed = plan.packed_bytes(config.key, flush, head_dim) + plan.packed_bytes(config.value, flush, head_dim)
    return 2 * dense_tokens * head_dim * element_size + packed


def cache_bytes(
    shape: CacheShape, kind: CacheKind, batch: int, length: int, dtype: torch.dtype | str, full_window: bool = False
) -> int:
    """Exact bytes `kind` holds after a single prefill of `length` tokens at batch size `batch`.

    For kvpack caches this equals `KVPackCache(config, spec).nbytes()` after each layer's `update` with keys and
    values `[batch, kv_heads, length, head_dim]` in `dtype` (the model dtype: residual and sink tokens use it).
    For fp caches, the bytes of the keys/values a `DynamicCache` in the cache's own dtype keeps. A kvpack cache's
    bytes dip where a block leaves the exact window for the packed buffers; with `full_window` its exact buffer is
    counted at its largest (an upper bound, non-decreasing in `length`). Raises `ShapeError` when the model's
    head_dim does not fit the spec's groups.
    """
    if batch < 1 or length < 0:
        raise ConfigError(f"batch {batch} and length {length} must be >= 1 and >= 0.")
    element_size = _as_dtype(dtype).itemsize
    windows = [window for layer_type, window in shape.plan if layer_type != "dummy"]
    if kind.config is not None:
        plan.check_head_dims(kind.config, shape.head_dim, shape.head_dim, where=f"{kind.config.spec}: ")
        row = [_kvpack_row_bytes(kind.config, w, length, shape.head_dim, element_size, full_window) for w in windows]
    else:
        assert kind.dtype is not None  # a DynamicSlidingWindowLayer keeps `states[:, :, -window + 1:]`
        tokens = [length if w is None or w <= 1 else min(length, w - 1) for w in windows]
        row = [n * 2 * shape.head_dim * kind.dtype.itemsize for n in tokens]
    return batch * shape.kv_heads * sum(row)


def bytes_per_token(shape: CacheShape, kind: CacheKind, dtype: torch.dtype | str) -> float:
    """Marginal bytes per additional cached token at batch 1, for long contexts (past every window and block)."""
    n = _MARGINAL_TOKENS
    return (cache_bytes(shape, kind, 1, 2 * n, dtype) - cache_bytes(shape, kind, 1, n, dtype)) / n


def max_context(
    shape: CacheShape, kind: CacheKind, batch: int, dtype: torch.dtype | str, budget_bytes: int, fixed_bytes: int = 0
) -> int | None:
    """Largest N such that every length up to N fits: `fixed_bytes + cache_bytes(n) <= budget_bytes` for all n <= N
    (a sequence decoded to N tokens passes through each of them).

    fixed_bytes: memory that does not grow with the context (the weights). Returns 0 when not even one token
    fits, None when every length up to 2**40 tokens fits (a cache that stops growing, e.g. fp window layers).
    A binary search on the upper bound (`full_window`, non-decreasing) finds a length up to which everything fits;
    the exact bytes are then followed from there to the first length that does not fit.
    """

    def fits(n: int, full_window: bool = False) -> bool:
        return fixed_bytes + cache_bytes(shape, kind, batch, n, dtype, full_window) <= budget_bytes

    if not fits(1):
        return 0
    # Every length below the first one that the upper bound does not fit fits (None: none up to 2**40 fails).
    low = bisect.bisect_left(range(1, _MAX_SEARCH_TOKENS + 1), True, key=lambda m: not fits(m, full_window=True))
    if low == _MAX_SEARCH_TOKENS:
        return None
    # The exact bytes stay below the bound, so follow them from there. A cache made only of window layers never
    # grows past its window: once that and a whole cycle of its exact tokens (sinks, residual, a packed block)
    # past `low` fit, its bytes only repeat, and every length fits.
    windows = [window for layer, window in shape.plan if layer != "dummy"]
    if windows and all(window is not None for window in windows):
        cycle = plan.exact_capacity(kind.config) if kind.config is not None else 1
        horizon = low + max(w for w in windows if w is not None) + 2 * cycle
    else:  # a full-attention layer grows without end: the walk ends at the first length that does not fit
        horizon = _MAX_SEARCH_TOKENS
    n = max(low, 1)
    while fits(n + 1):
        n += 1
        if n > horizon:
            return None
    return n


# -- weights --------------------------------------------------------------------------------------------------


class WeightTensor(NamedTuple):
    """One parameter of a model: its name, shape, and input channels if int8/int4 quantize it (else None)."""

    name: str
    shape: tuple[int, ...]
    inputs: int | None


def weight_tensors(config: PretrainedConfig) -> list[WeightTensor]:
    """Every parameter of the model `AutoModelForCausalLM.from_config(config)` builds, built on the meta device.

    Listed as `named_parameters()` lists them: a tensor shared by two modules (embeddings tied to lm_head) once.
    Raises `UnsupportedModelError` when transformers has no causal LM for the config.
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:  # its message goes on to list every supported config class
        reason = str(exc).splitlines()[0]
        raise UnsupportedModelError(f"no causal LM to count the weights of ({reason}); weights are left out.") from exc
    head = model.get_output_embeddings()
    kept_float = (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    modules = dict(model.named_modules())
    tensors = []
    for name, param in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        quantized = param.dim() >= 2 and owner is not head and not isinstance(owner, kept_float)
        # Input channels: the last dim (`x @ W.T`), the second-last where the module stores W transposed.
        transposed = isinstance(owner, Conv1D) or getattr(owner, "is_transposed", False)
        inputs = param.shape[-2 if transposed else -1] if quantized else None
        tensors.append(WeightTensor(name, tuple(param.shape), inputs))
    return tensors


def weight_bytes(tensors: Sequence[WeightTensor], fmt: str) -> int:
    """Bytes of the weights in `fmt` (fp16, int8, int4), as `WEIGHTS_METHOD` describes."""
    if fmt not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown weight format {fmt!r}; use one of {', '.join(WEIGHT_FORMATS)}.")
    total = 0
    for _, shape, inputs in tensors:
        size = math.prod(shape)
        if fmt == "fp16" or inputs is None:
            total += size * 2
        elif fmt == "int8":
            total += size + size // inputs * 2  # codes + one float16 scale per output channel
        else:  # codes + a float16 scale and zero per group of input channels
            total += size // inputs * (packed_row_bytes(inputs, 4) + -(-inputs // INT4_GROUP) * 2 * 2)
    return total


def _weights_section(config: PretrainedConfig, formats: Sequence[str]) -> dict[str, Any]:
    for fmt in formats:
        weight_bytes([], fmt)  # an unknown format fails before the model is built
    try:
        tensors = weight_tensors(config)
    except UnsupportedModelError as exc:
        return {"formats": list(formats), "error": str(exc)}
    return {
        "formats": list(formats),
        "method": WEIGHTS_METHOD,
        "parameters": sum(math.prod(t.shape) for t in tensors),
        "bytes": {fmt: weight_bytes(tensors, fmt) for fmt in formats},
    }


# -- the table ------------------------------------------------------------------------------------------------


def memory_table(
    config: PretrainedConfig,
    cache_specs: Sequence[str | CacheConfig],
    batch_sizes: Sequence[int],
    lengths: Sequence[int],
    dtype: torch.dtype | str = DEFAULT_DTYPE,
    weights: Sequence[str] | None = None,
    budget_gib: float | None = None,
) -> dict[str, Any]:
    """The JSON-ready memory table of a model config (no weights loaded).

    cache_specs: fp16 / bf16 / fp32 and kvpack specs; dtype: the model dtype (kvpack's residual and sink tokens).
    weights: formats among fp16, int8, int4 to add the model's weight bytes (and totals); budget_gib: also find
    the max context that fits in that many GiB, for each cache and batch size, with and without each weight format.
    Returns `{"model", "dtype", "caches", "batch_sizes", "lengths", "cells", "weights"?, "max_context"?}`; each
    cell has the exact cache bytes and the ratio vs a float16 `DynamicCache` of the same tokens.
    """
    model_dtype = _as_dtype(dtype)
    kinds = [parse_cache(spec) for spec in cache_specs]
    if not kinds:
        raise ConfigError("give at least one cache (e.g. fp16,k4v4).")
    batches, token_counts = list(batch_sizes), list(lengths)
    if not batches or not token_counts or min(batches) < 1 or min(token_counts) < 1:
        raise ConfigError(f"batch sizes {batches} and lengths {token_counts} must be non-empty and >= 1.")
    if budget_gib is not None and budget_gib <= 0:
        raise ConfigError(f"--budget-gib {budget_gib} must be positive.")
    shape, fp16 = plan.cache_shape(config), parse_cache("fp16")
    fp16_per_token = bytes_per_token(shape, fp16, model_dtype)
    caches = []
    for kind in kinds:
        per_token = bytes_per_token(shape, kind, model_dtype)
        caches.append({
            "name": kind.name,
            "kind": "kvpack" if kind.is_kvpack else "dynamic",
            "dtype": _dtype_name(model_dtype if kind.is_kvpack else kind.dtype),
            "config": kind.config.to_dict() if kind.config is not None else None,
            "description": kind.describe(model_dtype),
            "bytes_per_token": per_token,
            "vs_fp16_per_token": fp16_per_token / per_token if per_token else None,
        })  # fmt: skip
    weights_info = _weights_section(config, weights) if weights else None
    weight_sizes: dict[str, int] = weights_info.get("bytes", {}) if weights_info else {}
    cells = []
    for batch, length in itertools.product(batches, token_counts):
        reference = cache_bytes(shape, fp16, batch, length, model_dtype)
        for kind in kinds:
            held = cache_bytes(shape, kind, batch, length, model_dtype)
            cells.append({"cache": kind.name, "batch": batch, "length": length, "bytes": held})
            cells[-1]["vs_fp16"] = reference / held if held else None
            if weight_sizes:
                cells[-1]["total_bytes"] = {fmt: size + held for fmt, size in weight_sizes.items()}
    model = model_summary(config)
    result: dict[str, Any] = {"model": model, "dtype": _dtype_name(model_dtype), "caches": caches}
    result.update(batch_sizes=batches, lengths=token_counts, cells=cells)
    if weights_info is not None:
        result["weights"] = weights_info
    if budget_gib is not None:
        budget, limit = int(budget_gib * GIB), model["max_position_embeddings"]
        rows = []
        for kind, fmt, batch in itertools.product(kinds, [None, *weight_sizes], batches):
            tokens = max_context(shape, kind, batch, model_dtype, budget, weight_sizes[fmt] if fmt else 0)
            rows.append({"cache": kind.name, "weights": fmt, "batch": batch, "max_length": tokens})
            rows[-1]["beyond_max_position"] = limit is not None and (tokens is None or tokens > limit)
        result["max_context"] = {"budget_gib": budget_gib, "budget_bytes": budget, "rows": rows}
    return result


# -- measurement ----------------------------------------------------------------------------------------------


def default_measure_cells(batch_sizes: Sequence[int], lengths: Sequence[int]) -> list[tuple[int, int]]:
    """The sample `--measure` fills: batch 1 and 4 x 512, 2048 and 8192 tokens, where the table has them."""
    batches = [b for b in MEASURE_BATCHES if b in batch_sizes] or [min(batch_sizes)]
    tokens = [n for n in MEASURE_LENGTHS if n in lengths] or sorted(lengths)[:2]
    return [(b, n) for b in batches for n in tokens]


def _measure_fill(
    config: PretrainedConfig, kind: CacheKind, x: torch.Tensor
) -> tuple[int, int, int | None, int | None]:
    """Fill a fresh cache of `kind` (each caching layer's `update` once, `x` as keys and values) and measure it as
    `measure_cells` describes: `(counted, storage_bytes, growth, peak)`. Its storages: those of every tensor of a
    kvpack layer (attributes and one level below), of the keys and values of a DynamicCache layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DummyLayer

    from kvpack.cache import KVPackCache

    cuda = x.device.type == "cuda"
    release_freed_memory(x.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device) if cuda else rss_bytes() or 0
    cache: Any = KVPackCache(config, kind.config) if kind.config is not None else DynamicCache(config=config)
    for layer in cache.layers:
        if not isinstance(layer, DummyLayer):
            layer.update(x, x)
    release_freed_memory(x.device)
    if kind.is_kvpack:
        attributes = [value for layer in cache.layers for value in vars(layer).values()]
        objects = [obj for obj in attributes if hasattr(obj, "__dict__") and not isinstance(obj, type | torch.Tensor)]
        held = attributes + [value for obj in objects for value in vars(obj).values()]
        counted = int(cache.nbytes())
    else:
        held = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
        counted = sum(t.nbytes for t in held if isinstance(t, torch.Tensor))
    storages: dict[int, torch.UntypedStorage] = {}
    for t in held:
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    storage_bytes = sum(s.nbytes() for s in storages.values())
    if cuda:
        peak = torch.cuda.max_memory_allocated(x.device) - before
        return counted, storage_bytes, torch.cuda.memory_allocated(x.device) - before, peak
    # A cache preallocates buffers it has not written yet (the free slots of the residual buffer), whose pages count
    # in RSS only once written: rewrite every byte with itself so RSS sees what was allocated.
    for storage in storages.values():
        torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).bitwise_or_(0)
    after = rss_bytes()
    return counted, storage_bytes, after - before if after is not None else None, None


def measure_cells(
    config: PretrainedConfig,
    cache_specs: Sequence[str | CacheConfig],
    cells: Sequence[tuple[int, int]],
    dtype: torch.dtype | str = DEFAULT_DTYPE,
    device: str | torch.device = "cpu",
    max_gib: float = MEASURE_MAX_GIB,
    seed: int = 0,
) -> dict[str, Any]:
    """Fill real caches for `cells` (batch, length) and check the formula against them; the JSON-ready report.

    Each cache is built from `config` and each caching layer's `update` is called once with random keys/values
    `[batch, kv_heads, length, head_dim]` (the model dtype for kvpack, the cache's own dtype for fp caches): no
    weights are needed. Per cell and cache: the formula, the cache's own count (`nbytes()`, or the keys/values
    tensors of a DynamicCache), the bytes of the storages it holds, and the memory the process gained (RSS, on
    CPU, after returning freed memory to the OS and touching every held page) or the device gained
    (`torch.cuda.memory_allocated`; the peak, `max_memory_allocated`, is reported too).

    Raises `KVPackError` when the count differs from the formula at all, when a kvpack cache holds storage its
    `nbytes()` does not count, or, for cells of at least 64 MiB, when the measured growth differs from the held
    storage by more than 2%. Cells whose largest cache would exceed `max_gib` GiB are skipped (and listed).
    """
    model_dtype, dev = _as_dtype(dtype), torch.device(device)
    kinds = [parse_cache(spec) for spec in cache_specs]
    shape = plan.cache_shape(config)
    if dev.type == "cuda":
        method = "torch.cuda.memory_allocated growth"
    elif rss_bytes() is not None:
        method = "RSS growth" + ("" if libc() is not None else " (no malloc_trim: freed memory may be reused)")
    else:
        method = "none (no psutil or /proc/self/statm): memory not measured"
    generator = torch.Generator(device=dev).manual_seed(seed)

    def sample(batch: int, length: int, kind: CacheKind) -> torch.Tensor:
        size = (batch, shape.kv_heads, length, shape.head_dim)
        x = torch.randn(size, generator=generator, device=dev, dtype=torch.float32)
        return x.to(model_dtype if kind.is_kvpack else kind.dtype)

    for kind in kinds:  # warm up (a prefill that packs blocks): torch's first-call allocations are not the cache's
        c = kind.config
        _measure_fill(config, kind, sample(1, c.sinks + c.residual + 2 * c.block_tokens if c is not None else 8, kind))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for batch, length in cells:
        largest = max(cache_bytes(shape, kind, batch, length, model_dtype) for kind in kinds)
        if largest > max_gib * GIB:
            skipped.append({"batch": batch, "length": length, "largest_bytes": largest})
            continue
        for kind in kinds:  # the keys/values are made before the fill is measured (the fp cache keeps them)
            counted, storage_bytes, growth, peak = _measure_fill(config, kind, sample(batch, length, kind))
            formula = cache_bytes(shape, kind, batch, length, model_dtype)
            row = _check_cell(kind, batch, length, formula, counted, storage_bytes, growth)
            rows.append({**row, "peak_growth_bytes": peak})
    release_freed_memory(dev)
    return {
        "device": str(dev),
        "method": method,
        "tolerance": MEASURE_TOLERANCE,
        "min_checked_bytes": MEASURE_MIN_CHECKED_BYTES,
        "max_gib": max_gib,
        "rows": rows,
        "skipped": skipped,
    }


def _check_cell(
    kind: CacheKind, batch: int, length: int, formula: int, counted: int, storage_bytes: int, growth: int | None
) -> dict[str, Any]:
    """One measured row; raises `KVPackError` where the formula, `nbytes()` or the memory growth disagree."""
    where = f"{kind.name} at batch {batch}, {length} tokens"
    if counted != formula:
        what = "nbytes()" if kind.is_kvpack else "the DynamicCache's keys/values"
        raise KVPackError(
            f"{where}: {what} = {counted:,} bytes but the formula gives {formula:,} "
            f"({counted - formula:+,}); kvpack.bench.memory no longer matches the cache layout, fix the formula."
        )
    if kind.is_kvpack and storage_bytes != counted:
        raise KVPackError(
            f"{where}: the cache holds {storage_bytes:,} bytes of tensor storage but nbytes() counts {counted:,}; "
            "nbytes() must count every byte the cache holds (views of larger buffers included)."
        )
    notes = []
    if growth is None:
        notes.append("memory not measured")
    elif storage_bytes < MEASURE_MIN_CHECKED_BYTES:
        notes.append(f"under {MEASURE_MIN_CHECKED_BYTES // MIB} MiB, where page rounding of each tensor is a few %")
    elif abs(error := (growth - storage_bytes) / storage_bytes) > MEASURE_TOLERANCE:
        raise KVPackError(
            f"{where}: the process gained {growth:,} bytes of memory but the cache holds {storage_bytes:,} "
            f"({error:+.2%}, tolerance ±{MEASURE_TOLERANCE:.0%}): the exact count does not describe real memory. "
            "Rerun on an idle machine; if it persists, find what the cache allocates beyond its tensors."
        )
    if storage_bytes != counted:  # fp sliding layers: a view of the prefill's whole keys/values until the next step
        notes.append(
            f"holds {storage_bytes:,} bytes of storage for {counted:,} bytes of keys/values (transformers keeps the "
            "window as a view of the prefill's states until the next update)"
        )
    return {
        "cache": kind.name,
        "batch": batch,
        "length": length,
        "formula_bytes": formula,
        "nbytes": counted,
        "storage_bytes": storage_bytes,
        "growth_bytes": growth,
        "growth_vs_storage": growth / storage_bytes if growth is not None and storage_bytes else None,
        "checked": growth is not None and storage_bytes >= MEASURE_MIN_CHECKED_BYTES,
        "note": "; ".join(notes),
    }


# -- Markdown -------------------------------------------------------------------------------------------------


def _ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _tokens(n: int | None, limit: int | None) -> str:
    if n is None:
        return "unbounded"
    mark = " †" if limit and n > limit else ""
    return f"{n:,}{mark}"


def _measured_row(r: dict[str, Any]) -> list[str]:
    growth, share = r["growth_bytes"], r["growth_vs_storage"]
    numbers = [f"{r[key]:,}" for key in ("length", "formula_bytes", "nbytes")]
    memory = ["—" if growth is None else format_bytes(growth), "—" if share is None else f"{share:.4f}"]
    status = ("ok" if r["checked"] else "not checked") + (f": {r['note']}" if r["note"] else "")
    return [f"`{r['cache']}`", str(r["batch"]), *numbers, *memory, status]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return "\n".join(markdown_table(header, rows))


def to_markdown(result: dict[str, Any]) -> str:
    """The Markdown report of a `memory_table` result (with the run's provenance and measurements if present)."""
    model, caches, batches, lengths = result["model"], result["caches"], result["batch_sizes"], result["lengths"]
    names = [c["name"] for c in caches]
    name_columns = [f"`{n}`" for n in names]
    limit = model.get("max_position_embeddings")
    by_cell = {(c["batch"], c["length"], c["cache"]): c for c in result["cells"]}
    layer_text = ", ".join(f"{count} {kind}" for kind, count in model["layer_types"].items())
    blocks = [  # paragraphs, headings and tables, joined with a blank line between them
        f"# KV-cache memory: {result.get('model_name', model['model_type'])}",
        f"{model['model_type']}: {model['layers']} layers ({layer_text}), {model['kv_heads']} KV heads x head_dim "
        f"{model['head_dim']}, max position embeddings {limit or 'unknown'}. Model dtype {result['dtype']}: kvpack's "
        "residual and sink tokens are stored in it.",
    ]
    if "date" in result:
        blocks.append("\n".join(provenance_lines(result)))
    blocks.append(
        "Exact bytes each cache holds after a prefill of N tokens at batch size B, computed from the config (no "
        "weights loaded): for kvpack specs, `KVPackCache.nbytes()`: packed codes, float16 scales and zeros, the "
        "exact residual window and sinks in the model dtype (a buffer that fits them after the prefill; decoding "
        "grows it by at most a block); for fp16/bf16/fp32, "
        "the keys and values transformers' DynamicCache keeps. The ratio is float16 DynamicCache bytes / this cache's "
        "bytes. 1 GiB = 2^30 bytes. The cache alone: weights, activations and workspace are extra."
    )
    if any("window" in kind for kind in model["layer_types"]):
        blocks.append(
            "Sliding-window layers: the fp caches keep the last window - 1 tokens; kvpack's sliding layers keep "
            "the packed blocks that overlap the window plus a margin of residual + block tokens (so that a rollback "
            "stays exact), and release the rest after a prefill."
        )
    if limit and any(n > limit for n in lengths):
        blocks.append(
            f"† beyond the model's max position embeddings ({limit:,}): the memory it would take, not a "
            "context the model was trained for."
        )
    rows = [
        [f"`{c['name']}`", c["description"], f"{c['bytes_per_token']:,.0f}", _ratio(c["vs_fp16_per_token"])]
        for c in caches
    ]
    header = ["cache", "what it holds", "bytes per token (batch 1, long context)", "vs fp16"]
    blocks += ["## Caches", _table(header, rows)]
    for batch in batches:
        cells = [(n, [by_cell[(batch, n, name)] for name in names]) for n in lengths]
        rows = [
            [_tokens(n, limit), *(f"{format_bytes(c['bytes'])} ({_ratio(c['vs_fp16'])})" for c in row)]
            for n, row in cells
        ]
        blocks += [f"## Batch {batch}", _table(["tokens", *name_columns], rows)]
    weights = result.get("weights")
    if weights is not None and "error" in weights:
        blocks += ["## Weights", f"Weights not shown: {weights['error']}"]
    elif weights is not None:
        rows = [[fmt, f"{weights['parameters']:,}", format_bytes(size)] for fmt, size in weights["bytes"].items()]
        blocks += ["## Weights", weights["method"], _table(["format", "parameters", "bytes"], rows)]
        for fmt, size in weights["bytes"].items():
            rows = [
                [
                    str(b),
                    _tokens(n, limit),
                    *(format_bytes(by_cell[(b, n, name)]["total_bytes"][fmt]) for name in names),
                ]
                for b, n in itertools.product(batches, lengths)
            ]
            blocks.append(f"### Total: {fmt} weights ({format_bytes(size)}) + cache")
            blocks.append(_table(["batch", "tokens", *name_columns], rows))
    context = result.get("max_context")
    if context is not None:
        budget = context["budget_gib"]
        blocks.append(f"## Max context in {budget:g} GiB")
        blocks.append(
            f"The largest N such that the cache (plus the weights, where shown) fits in {budget:g} GiB = "
            f"{context['budget_bytes']:,} bytes at every length up to N (the exact formula, as a sequence decoded to N "
            "passes through each). 0: not even one token fits."
            + (f"\n† beyond the model's max position embeddings ({limit:,})." if limit else "")
        )
        grid = {(r["cache"], r["weights"], r["batch"]): r["max_length"] for r in context["rows"]}
        for fmt in dict.fromkeys(r["weights"] for r in context["rows"]):  # cache only, then as given
            rows = [[f"`{name}`", *(_tokens(grid[(name, fmt, b)], limit) for b in batches)] for name in names]
            blocks.append(f"### {'cache only' if fmt is None else f'{fmt} weights + cache'}")
            blocks.append(_table(["cache", *(f"batch {b}" for b in batches)], rows))
    measured = result.get("measurements")
    if measured is not None:
        blocks.append("## Measured (`--measure`)")
        blocks.append(
            f"Real caches built from the config and filled by each layer's `update` with random keys/values on "
            f"{measured['device']}; formula vs the cache's own count (must be equal) and the memory gained "
            f"({measured['method']}, must be within ±{measured['tolerance']:.0%} of the storage the cache holds; "
            f"checked from {measured['min_checked_bytes'] // MIB} MiB, smaller cells are too coarse for it). On CPU, "
            "freed memory is returned to the OS (`malloc_trim`) and every held page touched before RSS is read, so it "
            "counts what was allocated."
        )
        header = ["cache", "batch", "tokens", "formula (bytes)", "nbytes() (bytes)", "memory growth", "growth / held"]
        blocks.append(_table([*header, "check"], [_measured_row(r) for r in measured["rows"]]))
        blocks += [
            f"Skipped batch {s['batch']} x {s['length']:,} tokens: its largest cache, "
            f"{format_bytes(s['largest_bytes'])}, is over the --measure cap of {measured['max_gib']:g} GiB."
            for s in measured["skipped"]
        ]
    return "\n\n".join(blocks) + "\n"


# -- command line ---------------------------------------------------------------------------------------------


def load_config(model: str | None) -> tuple[PretrainedConfig, str]:
    """`(config, name)` of a model, config only (no weights): the embedded default when `model` is None.

    model: None (the embedded SmolLM2's GGUF), a `.json` config file, a `.gguf` file, a local model directory,
    or a model id already in the Hugging Face cache. Raises `ModelNotFoundError` when it cannot be read offline.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    name = DEFAULT_MODEL if model is None else model
    try:
        path = default_model_file() if name == DEFAULT_MODEL else Path(name)
        if path.suffix == ".gguf" and path.is_file():
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), name
        if path.suffix != ".json" or not path.is_file():
            return AutoConfig.from_pretrained(name, local_files_only=True), name
        data = json.loads(path.read_text(encoding="utf-8"))
        model_type = data.get("model_type") if isinstance(data, dict) else None
        if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
            return CONFIG_MAPPING[model_type].from_json_file(str(path)), name
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot read the config of {model!r} without a download: {exc}. Pass a config .json file, a .gguf file, "
            "a local model directory or a model already in the Hugging Face cache, or omit --model."
        ) from exc
    raise ModelNotFoundError(f'{path}: a config file needs a known "model_type" (e.g. "llama"), got {model_type!r}.')
