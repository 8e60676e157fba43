"""Calibrated per-layer bit allocation (`kvpack calibrate`): measure, allocate, write a profile.

1. Sensitivity. For each layer, for its keys and its values separately, and for each candidate bit width, the
   damage done when only that tensor of that layer is quantized (everything else exact): the mean
   KL(exact || perturbed) of the next-token distributions over the calibration tokens (`n - 1` predictions, as
   `kvpack.eval.perplexity` streams them). It is measured with full-sequence forwards, not a token-by-token
   stream: a registered attention function quantize-dequantizes the chosen tensor exactly as a `KVPackCache`
   stores it (`PackedTensor.quantize(...).dequantize()`, blocks of `block_tokens` aligned after the sinks) and lets
   each query see what the cache would hold when that query is decoded one token at a time:
     - the first `sinks` tokens exact;
     - of the later tokens, the oldest `kvpack.cache.plan.flushed_tokens(m)` quantized, where `m` is the number of
       non-sink tokens stored before the query (the flush rule of `PackedLayer`: whole blocks leave the residual
       window once it holds `residual + block` tokens); the rest, and the query's own token, exact.
   This is the streamed cache's content token for token, so the emulation's only approximations are float
   rounding (a different order of operations in attention) and that it models single-token decoding: a cache
   filled by a long prefill chunk lets the chunk's queries see its own tokens exactly (see `PackedLayer.update`).
   Layers before the perturbed one are not recomputed: they return the outputs recorded in the exact pass.
2. Allocation. Choose one candidate per (layer, tensor) minimising the sum of the measured KLs (an additive
   model of the damage) subject to the average stored bits per value (codes + fp16 scale and zero per group; keys
   and values weighted by their head dims; sinks and residual excluded, as in `CacheConfig.bits_per_value`) being
   at most the budget. Metadata bits do not depend on the bit width, so the constraint is on the integer sum of
   code bits and an exact dynamic program over it (a multiple-choice knapsack) solves it: no Lagrangian gap.
3. A versioned JSON profile (`Profile`) records the choice, the sensitivity table and what it was measured on;
   `kvpack.profile.resolve_config` accepts its path wherever a spec string is accepted.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from kvpack.cache.plan import check_head_dims, flushed_tokens, layer_plan
from kvpack.compat import cache_kwargs
from kvpack.config import DEFAULT_PRESET, SUPPORTED_BITS, CacheConfig, QuantSpec, as_config
from kvpack.errors import ConfigError, ShapeError
from kvpack.profile import Profile, ProfileModel
from kvpack.texts import calibration_data_path, load_tokens
from kvpack.version import __version__

DEFAULT_BASE = DEFAULT_PRESET  # the default spec's options; only the bits vary per layer
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_TOKENS = 512
# How sensitivity is measured: "fisher" estimates every KL from one forward and backward pass (`fisher_sensitivity`);
# "emulate" runs the layers after the perturbed one for each measurement (`measure_sensitivity`), the exact value.
METHODS = ("fisher", "emulate")
DEFAULT_METHOD = "fisher"
TENSORS = ("key", "value")
_ATTENTION_NAME = "kvpack_calibrate"


# -- emulated sensitivity --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """What the calibration attention function quantizes: `tensors` of layer `layer` (every layer when None) with
    `config` (its `for_layer` config in each layer)."""

    layer: int | None
    tensors: tuple[str, ...]
    config: CacheConfig
    sliding: frozenset[int] = frozenset()  # sliding-window layers: stored without sinks (as `PackedSlidingLayer`)


@dataclass
class _Pass:
    """The state of one emulated forward pass (read by `_calibration_attention`)."""

    target: _Target | None = None


_active = _Pass()


def quantized_mask(tokens: int, config: CacheConfig, device: torch.device | None = None) -> torch.Tensor:
    """bool `[tokens, tokens]`: entry `[t, j]` is whether the query at position `t`, decoded one token at a time,
    reads key/value `j` from packed (quantized) storage (see the module doc)."""
    t = torch.arange(tokens, device=device)
    stored = (t - config.sinks).clamp(min=0)  # non-sink tokens in the cache when token t arrives
    limit = config.sinks + flushed_tokens(stored, config)
    return (t[None, :] >= config.sinks) & (t[None, :] < limit[:, None])


def emulate_stored(x: torch.Tensor, spec: QuantSpec, config: CacheConfig) -> torch.Tensor:
    """`x` `[batch, heads, tokens, dim]` with the tokens a streamed cache ends up packing quantize-dequantized.

    Those are the `flushed_tokens(tokens - 1 - sinks)` tokens after the sinks (whole blocks), what the last query
    reads packed; every earlier query reads a prefix of the same blocks, which are quantized identically (blocks
    are independent). Other tokens are returned unchanged.
    """
    from kvpack.quant.tensor import PackedTensor

    tokens = x.shape[2]
    start = config.sinks
    end = start + flushed_tokens(max(tokens - 1 - start, 0), config)
    if end == start:
        return x
    out = x.clone()
    out[:, :, start:end] = PackedTensor.quantize(x[:, :, start:end], spec).dequantize(x.dtype)
    return out


def _calibration_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, except in the target layer: attention that reads each key/value as the streamed cache would hold it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    target = _active.target
    tokens, queries = key.shape[2], query.shape[2]  # the queries are the last `queries` of the `tokens` positions
    layer_idx = getattr(module, "layer_idx", None)
    mask = None
    if target is not None and (target.layer is None or layer_idx == target.layer):
        config = target.config.for_layer(int(layer_idx or 0)) if target.config.layer_bits else target.config
        if layer_idx in target.sliding:  # the window moves past the first tokens: no sinks (`PackedSlidingLayer`)
            config = replace(config, sinks=0)
        mask = quantized_mask(tokens, config, key.device)[tokens - queries :]
    if target is None or mask is None or not bool(mask.any()):  # not perturbed, or nothing packed yet: as the cache
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ConfigError("kvpack calibrate does not emulate logit soft-capping or attention sinks (s_aux).")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    scores = (query.float() @ expand(key).float().transpose(-1, -2)) * scaling
    if "key" in target.tensors:
        stored = emulate_stored(key, config.key, config)
        scores = torch.where(mask, (query.float() @ expand(stored).float().transpose(-1, -2)) * scaling, scores)
    if attention_mask is None:
        positions = torch.arange(tokens, device=key.device)
        causal = positions[None, :] <= positions[tokens - queries :, None]
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., -tokens:], float("-inf"))
    else:
        scores = scores + attention_mask[..., -tokens:].float()
    probs = torch.softmax(scores, dim=-1)
    if "value" in target.tensors:
        stored = emulate_stored(value, config.value, config)
        out = (probs * ~mask) @ expand(value).float() + (probs * mask) @ expand(stored).float()
    else:
        out = probs @ expand(value).float()
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@contextmanager
def _calibration_attention_on(model: Any, target: _Target | None = None) -> Iterator[None]:
    """Run `model` with `_calibration_attention` perturbing `target`, restoring its attention implementation
    afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTENTION_NAME, _calibration_attention)
    AttentionMaskInterface.register(_ATTENTION_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ATTENTION_NAME)
    _active.target = target
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _active.target = None


def _decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The decoder layers of `model`, found by transformers' own rule (`get_decoder`, multimodal models included)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"kvpack calibrate cannot find the decoder layers of {type(model).__name__}.")
    return list(layers)


class SensitivityMeter:
    """Mean KL(exact || perturbed) over the next-token predictions of `ids` `[1, tokens]`, for perturbations of one
    layer's keys and/or values stored with configs that share `base`'s sinks, residual and block (see the module
    doc).

    Queries before position `sinks + residual + block` read nothing packed, so their predictions, and every layer's
    keys and values there, are exact whatever is perturbed: they run once, into a `DynamicCache`, and each
    measurement runs the rest of the tokens on it (then crops it back). The exact pass of the rest runs once too,
    recording each decoder layer's output: a measurement on layer `l` reuses the outputs of the layers before `l`.
    Predictions of the exact prefix count as zeros in the mean, as a streamed run's do.
    """

    def __init__(self, model: Any, ids: torch.Tensor, base: CacheConfig):
        from transformers import DynamicCache

        self.model = model
        self.base = base
        self.ids = ids.to(model.device)
        self.layers = _decoder_layers(model)
        self.predictions = self.ids.shape[1] - 1
        self.prefix = min(base.sinks + base.residual + base.block_tokens, self.predictions)
        self.cache = DynamicCache(config=model.config)
        if self.prefix:
            with torch.no_grad(), _calibration_attention_on(model):
                model(self.ids[:, : self.prefix], **cache_kwargs(model, self.cache), use_cache=True, logits_to_keep=1)
        self._outputs: list[Any] = [None] * len(self.layers)
        hooks = [
            layer.register_forward_hook(lambda _m, _a, out, i=i: self._outputs.__setitem__(i, out))
            for i, layer in enumerate(self.layers)
        ]
        try:
            self.reference = self._logprobs(None)
        finally:
            for hook in hooks:
                hook.remove()
        self._probs = self.reference.exp()
        self._neg_entropy = float((self._probs * self.reference).sum())

    def _logprobs(self, target: _Target | None) -> torch.Tensor:
        """`[predictions - prefix, vocab]` float64 log-probabilities of the next tokens after the exact prefix, with
        `target` perturbed (float64 so that the KL of a small perturbation is not lost in rounding)."""
        if self.prefix == self.predictions:
            return torch.empty(0, 1, dtype=torch.float64)
        originals: list[tuple[torch.nn.Module, Callable[..., Any] | None]] = []
        if target is not None:  # the layers before the perturbed one give what they gave in the exact pass
            for i in range(target.layer or 0):
                layer, recorded = self.layers[i], self._outputs[i]
                originals.append((layer, layer.__dict__.get("forward")))
                layer.forward = lambda *args, recorded=recorded, **kwargs: recorded
        try:
            with torch.no_grad(), _calibration_attention_on(self.model, target):
                out = self.model(self.ids[:, self.prefix :], **cache_kwargs(self.model, self.cache), use_cache=True)
                logits = out.logits[0, :-1].double()
        finally:
            cache_layers: list[Any] = list(self.cache.layers)
            for cache_layer in cache_layers:  # (the skipped layers did not grow)
                if cache_layer.get_seq_length() > self.prefix:
                    cache_layer.crop(self.prefix - cache_layer.get_seq_length())
            for layer, forward in originals:
                if forward is None:
                    del layer.forward  # the instance attribute: the class's forward shows again
                else:
                    layer.forward = forward
        return torch.log_softmax(logits, dim=-1)

    def kl(self, layer: int | None, tensors: Sequence[str], config: CacheConfig) -> float:
        """Mean KL(exact || perturbed) when `tensors` (`key`, `value`) of `layer` are stored as `config` says; with
        `layer=None`, those tensors of every layer at once (a whole cache config, per-layer bits included)."""
        shared = ("sinks", "residual", "block_tokens")
        if any(getattr(config, name) != getattr(self.base, name) for name in shared):
            raise ConfigError(f"{config.spec} differs from the meter's base {self.base.spec} in sinks/residual/block.")
        perturbed = self._logprobs(_Target(layer, tuple(tensors), config))
        if torch.equal(perturbed, self.reference):  # (exactly 0, not a difference of two rounded sums)
            return 0.0
        return (self._neg_entropy - float((self._probs * perturbed).sum())) / self.predictions


def measure_sensitivity(
    model: Any,
    ids: torch.Tensor,
    base: CacheConfig,
    candidates: Sequence[int],
    progress: bool = True,
) -> tuple[list[list[float]], list[list[float]]]:
    """`(key_kl, value_kl)`, each `[layer][candidate]`: the mean KL when only that tensor of that layer is
    quantized with `base` at that bit width (see the module doc). Layers without a cache get zeros."""
    from tqdm import tqdm

    plan = layer_plan(model.config)
    meter = SensitivityMeter(model, ids, base)
    table: dict[str, list[list[float]]] = {name: [[0.0] * len(candidates) for _ in plan] for name in TENSORS}
    jobs = [
        (layer, name, b_idx, bits)
        for layer, (kind, window) in enumerate(plan)
        if kind != "dummy"
        for name in TENSORS
        for b_idx, bits in enumerate(candidates)
    ]
    for layer, name, b_idx, bits in tqdm(jobs, desc="calibrate", disable=not progress, unit="run"):
        if plan[layer][1] is not None:
            raise ConfigError(
                f"layer {layer} is a sliding-window layer; kvpack calibrate emulates full-attention layers only."
            )
        spec = getattr(base, name)
        config = replace(base, layer_bits=(), **{name: replace(spec, bits=bits)})
        table[name][layer][b_idx] = meter.kl(layer, (name,), config)
    return table["key"], table["value"]


def sliding_layers(config: Any) -> frozenset[int]:
    """The indices of the sliding-window layers of a model config, by `layer_plan`."""
    return frozenset(i for i, (kind, window) in enumerate(layer_plan(config)) if kind != "dummy" and window)


@dataclass
class FisherRecord:
    """What one exact forward and backward pass over `ids` leaves for `fisher_table`: per cached layer, its attention
    module and inputs (query, key, value, mask, scaling) and the squared gradient of the summed next-token loss with
    respect to its attention output."""

    inputs: dict[int, tuple[Any, ...]]
    weights: dict[int, torch.Tensor]
    predictions: int
    sliding: frozenset[int]
    layers: int  # decoder layers of the model (`layer_plan`), cached or not


def fisher_record(model: Any, ids: torch.Tensor) -> FisherRecord:
    """Run `ids` `[1, tokens]` through `model` once forward and once backward and record what `fisher_table` needs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    ids = ids.to(model.device)
    records: dict[int, tuple[Any, ...]] = {}

    def recording_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        records[int(module.layer_idx)] = (module, query.detach(), key.detach(), value.detach(), attention_mask,
                                          kwargs.get("scaling"), out)  # fmt: skip
        return out, None

    name = _ATTENTION_NAME + "_fisher"
    AttentionInterface.register(name, recording_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.enable_grad():
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            layers = sorted(records)
            grads = torch.autograd.grad(loss, [records[i][-1] for i in layers])
    finally:
        model.set_attn_implementation(previous)
    return FisherRecord(
        inputs={layer: records[layer][:-1] for layer in layers},
        weights={layer: grad.detach().float() ** 2 for layer, grad in zip(layers, grads, strict=True)},
        predictions=ids.shape[1] - 1,
        sliding=sliding_layers(model.config),
        layers=len(layer_plan(model.config)),
    )


def fisher_table(
    record: FisherRecord,
    base: CacheConfig,
    candidates: Sequence[int],
    progress: bool = True,
    memo: dict[Any, Any] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """`(key_kl, value_kl)` `[layer][candidate]` estimated from `record` for the options of `base` (see
    `fisher_sensitivity`); layers without a cache get zeros.

    `memo` (a dict shared by calls on the same record) keeps each measurement under what it depends on: the layer,
    the tensor, how that tensor is stored, and the exact window (sinks, residual, blocks); option sets that store a
    tensor alike (the default and `-rot` store values alike) then measure it once. The tables are the same."""
    from tqdm import tqdm

    memo = {} if memo is None else memo
    table: dict[str, list[list[float]]] = {n: [[0.0] * len(candidates) for _ in range(record.layers)] for n in TENSORS}
    window = (base.sinks, base.residual, base.block_tokens)
    jobs = [(layer, tensor, b_idx, bits) for layer in sorted(record.inputs) for tensor in TENSORS
            for b_idx, bits in enumerate(candidates)]  # fmt: skip
    with torch.no_grad():
        for layer, tensor, b_idx, bits in tqdm(jobs, desc="calibrate (fisher)", disable=not progress, unit="run"):
            spec = replace(getattr(base, tensor), bits=bits)
            key = ("perturbed", layer, tensor, spec, *window)
            if key not in memo:
                memo[key] = _fisher_term(record, layer, replace(base, layer_bits=(), **{tensor: spec}), tensor, memo)
            table[tensor][layer][b_idx] = memo[key]
    return table["key"], table["value"]


def _fisher_term(record: FisherRecord, layer: int, config: CacheConfig, tensor: str, memo: dict[Any, Any]) -> float:
    """The Fisher estimate of storing `tensor` of `layer` as `config` says (see `fisher_sensitivity`)."""
    module, query, key, value, mask, scaling = record.inputs[layer]
    exact_key = ("exact", layer, config.sinks, config.residual, config.block_tokens)
    try:
        if exact_key not in memo:  # the same arithmetic as the perturbed output, nothing stored quantized
            _active.target = _Target(layer, (), config, record.sliding)
            memo[exact_key] = _calibration_attention(module, query, key, value, mask, scaling=scaling)[0].float()
        _active.target = _Target(layer, (tensor,), config, record.sliding)
        perturbed = _calibration_attention(module, query, key, value, mask, scaling=scaling)[0].float()
    finally:
        _active.target = None
    error = (record.weights[layer] * (perturbed - memo[exact_key]) ** 2).sum()
    return 0.5 * float(error) / record.predictions


def fisher_sensitivity(
    model: Any,
    ids: torch.Tensor,
    base: CacheConfig,
    candidates: Sequence[int],
    progress: bool = True,
) -> tuple[list[list[float]], list[list[float]]]:
    """`(key_kl, value_kl)` as `measure_sensitivity` returns them, estimated from ONE forward and backward pass.

    The exact pass records every layer's query, key and value and the gradient of the summed next-token loss with
    respect to its attention output (`fisher_record`). A (layer, tensor, bits) perturbation is then evaluated
    locally (`fisher_table`): the attention output `o'` that layer computes when the tensor is stored as the cache
    stores it (the same emulation as the meter's, `_calibration_attention`; sliding-window layers without sinks, as
    `PackedSlidingLayer` stores them), and the estimated KL is the second-order term with the empirical diagonal
    Fisher information of that output, `0.5 * sum(g**2 * (o' - o)**2) / predictions` (KVQuant weights its
    quantization error by the Fisher information the same way). Cost: one forward and backward pass plus one
    attention per measurement, linear in layers x candidates, instead of a forward of the layers after the perturbed
    one per measurement. An estimate: it ignores how the error propagates non-linearly through later layers.
    """
    return fisher_table(fisher_record(model, ids), base, candidates, progress)


@dataclass(frozen=True)
class Emulated:
    """The quality of one cache config over a text (see `emulated_quality`): mean KL(exact || cached) of the next-token
    distributions, and the perplexity of the text under the cached and under the exact model."""

    kl: float
    ppl: float
    reference_ppl: float

    @property
    def delta_ppl_pct(self) -> float:
        """The cached model's perplexity relative to the exact model's, in percent."""
        return 100 * (self.ppl / self.reference_ppl - 1)


def emulated_quality(
    model: Any, ids: torch.Tensor, configs: Sequence[CacheConfig], progress: bool = True, chunk: int = 128
) -> list[Emulated]:
    """Per config, the mean KL(exact || cached) of the next-token distributions over `ids` `[1, tokens]`, and the
    perplexities, when every layer's keys and values are stored as that config says (per-layer bits included),
    emulated over the whole sequence as the calibration attention does (see the module doc): one forward per config,
    no cache. What streaming the tokens one at a time through a `KVPackCache` gives, up to float rounding."""
    from tqdm import tqdm

    ids = ids.to(model.device)
    sliding = sliding_layers(model.config)
    predictions = ids.shape[1] - 1
    targets = ids[0, 1:]

    def logits(target: _Target | None) -> torch.Tensor:
        with torch.no_grad(), _calibration_attention_on(model, target):
            return model(ids, use_cache=False).logits[0, :-1].float()

    reference = logits(None)
    # Per reference row, its log-normalizer in float64, and the text's log-likelihood under it, once.
    normalizers = torch.cat([torch.logsumexp(reference[start : start + chunk].double(), dim=-1)
                             for start in range(0, predictions, chunk)])  # fmt: skip
    reference_nll = -float((reference.gather(1, targets[:, None])[:, 0].double() - normalizers).sum())
    results = []
    for config in tqdm(configs, desc="calibrate (check)", disable=not progress, unit="config"):
        perturbed = logits(_Target(None, TENSORS, config, sliding))
        kl = nll = 0.0
        for start in range(0, predictions, chunk):  # in chunks: a large vocabulary fits in memory
            rows = slice(start, start + chunk)
            row_kl, log_q = _kl_rows(reference[rows], normalizers[rows], perturbed[rows], targets[rows])
            kl += float(row_kl.sum())
            nll -= float(log_q.sum())
        results.append(Emulated(kl / predictions, math.exp(nll / predictions), math.exp(reference_nll / predictions)))
    return results


def _kl_rows(
    reference: torch.Tensor, normalizers: torch.Tensor, perturbed: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits, KL(softmax(reference) || softmax(perturbed)) and log softmax(perturbed)[target], float64.

    With p = softmax(reference) (`normalizers`: its float64 log-normalizers) and d = reference - perturbed less its
    p-weighted mean (a shift of a row's logits changes neither distribution), KL = sum(p d) + log Z and
    log q = perturbed - logsumexp(reference) - log Z, where Z = sum(p exp(-d)) = 1 + sum(p expm1(-d)) is taken
    through `log1p`: each term is computed to float32's relative precision of its own size, so a KL of 1e-10 keeps
    its digits without a float64 copy of the vocabulary.
    """
    p = torch.exp(reference - normalizers[:, None].float())
    total = p.sum(dim=-1, dtype=torch.float64)  # 1 up to rounding: normalize by it
    d = reference - perturbed
    mean = (p * d).sum(dim=-1, dtype=torch.float64) / total
    shift = mean.float()
    d -= shift[:, None]
    first = mean - shift.double()  # sum(p d) of the centred d, without a second pass over the vocabulary
    log_z = torch.log1p((p * torch.expm1(-d)).sum(dim=-1, dtype=torch.float64) / total)
    log_q = perturbed.gather(1, targets[:, None])[:, 0].double() - normalizers + shift.double() - log_z
    return first + log_z, log_q


def emulated_kl(
    model: Any, ids: torch.Tensor, configs: Sequence[CacheConfig], progress: bool = True, chunk: int = 128
) -> list[float]:
    """Per config, the mean KL(exact || cached) of `emulated_quality`."""
    return [quality.kl for quality in emulated_quality(model, ids, configs, progress, chunk)]


# -- allocation ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """The chosen `(key_bits, value_bits)` per layer, their summed KL and average bits per value."""

    layer_bits: tuple[tuple[int, int], ...]
    total_kl: float
    average_bits: float


def allocate(
    key_kl: Sequence[Sequence[float]],
    value_kl: Sequence[Sequence[float]],
    candidates: Sequence[int],
    base: CacheConfig,
    budget_bits: float,
    key_dim: int = 1,
    value_dim: int = 1,
) -> Allocation:
    """Per-layer bits minimising the summed KL with `CacheConfig.average_bits(key_dim, value_dim) <= budget_bits`.

    key_kl, value_kl: `[layer][candidate]`. Exact: a dynamic program over the integer sum of code bits weighted by
    the head dims (the metadata bits do not depend on the bit widths). Among optima, the fewest bits. Raises
    ConfigError when even the smallest candidate everywhere exceeds the budget.
    """
    if len(key_kl) != len(value_kl) or not key_kl:
        raise ConfigError("allocate needs one key row and one value row per layer.")
    if not candidates or any(b not in SUPPORTED_BITS for b in candidates):
        raise ConfigError(f"candidate bits {tuple(candidates)} must be among {SUPPORTED_BITS}.")
    n_layers = len(key_kl)
    unit = math.gcd(key_dim, value_dim)
    weights = {"key": key_dim // unit, "value": value_dim // unit}
    # Budget on code bits: budget * elements - metadata bits, in units of `unit` elements' bits, exactly.
    meta = Fraction(32, base.key.group_size) * key_dim + Fraction(32, base.value.group_size) * value_dim
    capacity = math.floor((Fraction(str(budget_bits)) * (key_dim + value_dim) - meta) * n_layers / unit)
    items = [(name, layer) for layer in range(n_layers) for name in TENSORS]
    rows = {"key": key_kl, "value": value_kl}
    minimum = sum(min(candidates) * weights[name] for name, _ in items)
    if minimum > capacity:
        floor_config = replace(base, layer_bits=tuple((min(candidates),) * 2 for _ in range(n_layers)))
        raise ConfigError(
            f"budget {budget_bits} bits per value is below the smallest allocation, {min(candidates)} bits everywhere "
            f"({floor_config.average_bits(key_dim, value_dim):g} bits per value with its metadata)."
        )
    # best[c]: (kl, choices) of the items so far using exactly c code-bit units; dict keeps only reachable c.
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for name, layer in items:
        row = rows[name][layer]
        if len(row) != len(candidates):
            raise ConfigError(f"layer {layer} {name} row has {len(row)} entries for {len(candidates)} candidates.")
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (kl, chosen) in best.items():
            for bits, cost in zip(candidates, row, strict=True):
                total = used + bits * weights[name]
                if total > capacity:
                    continue
                candidate = (kl + float(cost), (*chosen, bits))
                if total not in step or candidate[0] < step[total][0]:
                    step[total] = candidate
        best = step
    used, (total_kl, chosen) = min(best.items(), key=lambda entry: (entry[1][0], entry[0]))
    layer_bits = tuple((chosen[2 * i], chosen[2 * i + 1]) for i in range(n_layers))
    config = replace(base, layer_bits=layer_bits)
    return Allocation(layer_bits, total_kl, config.average_bits(key_dim, value_dim))


# -- the whole run ---------------------------------------------------------------------------------------------------


def calibrate(
    model: Any,
    tokenizer: Any,
    budget_bits: float,
    base: CacheConfig | str = DEFAULT_BASE,
    candidates: Sequence[int] = DEFAULT_BITS,
    tokens: int = DEFAULT_TOKENS,
    data: str | os.PathLike[str] | None = None,
    model_name: str = "model",
    progress: bool = True,
    method: str = DEFAULT_METHOD,
) -> Profile:
    """Measure the sensitivity of `model` on the calibration text and allocate bits within `budget_bits`.

    base: the spec whose every option (group sizes, axes, residual, sinks, rotation) is kept; only bits vary.
    data: a UTF-8 text file (default: kvpack's calibration text); its first `tokens` tokens are used.
    method: `fisher` (one forward and backward pass, an estimate; the default) or `emulate` (a forward per
    measurement, the exact emulated KL); see `METHODS`.
    """
    if method not in METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of {', '.join(METHODS)}.")
    base_config = as_config(base)
    if base_config.layer_bits:
        raise ConfigError(f"the base spec {base_config.spec} already has per-layer bits; give a uniform spec.")
    candidates = tuple(sorted(set(candidates)))
    path = Path(data) if data is not None else calibration_data_path()
    ids, sha256 = load_tokens(path, tokenizer, tokens)
    fingerprint = ProfileModel.of(model, model_name)
    check_head_dims(
        base_config, fingerprint.head_dim, fingerprint.head_dim, where=f"the base spec {base_config.spec}: "
    )
    start = time.perf_counter()
    measure = fisher_sensitivity if method == "fisher" else measure_sensitivity
    key_kl, value_kl = measure(model, ids, base_config, candidates, progress)
    measured = Profile(
        config=base_config,
        base=base_config.spec,
        model=fingerprint,
        budget_bits=budget_bits,
        average_bits=base_config.average_bits(fingerprint.head_dim, fingerprint.head_dim),  # (uniform, reallocated)
        candidates=candidates,
        key_kl=key_kl,
        value_kl=value_kl,
        method=method,
        **_provenance(path, sha256, tokens, start),
    )
    return reallocate(measured, budget_bits)


def _provenance(path: Path, sha256: str, tokens: int, start: float) -> dict[str, Any]:
    """The fields of a `Profile` that say what it was measured on, when and how long it took (since `start`)."""
    return {
        "data_name": path.name,
        "data_sha256": sha256,
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "kvpack_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


AUTO_BASES = ("k4v4", "k4v4-plain-s4", "k4v4-rot", "k4v4-clipk")
"""The options `calibrate_auto` chooses among, each with bits allocated per layer (the `k4v4` head only names the
options: `k4v4` the default's (values rotated, 4 sinks), `-plain-s4` nothing rotated (KIVI with sinks), `-rot` keys
rotated too, `-clipk` clipped key ranges)."""


def _uniform(base: CacheConfig, bits: int) -> CacheConfig:
    """`base` with keys and values at `bits`."""
    return replace(base, key=replace(base.key, bits=bits), value=replace(base.value, bits=bits))


def _longer_key_groups(
    bases: Sequence[CacheConfig], candidates: Sequence[int], budget_bits: float, model: ProfileModel
) -> list[CacheConfig]:
    """The option sets of `bases` again with key groups twice as long, where every layer at the smallest width fills
    `budget_bits` so that no layer could be given more bits (`k2v2` at 2.5 bits): their metadata costs less, which
    leaves bits to spend per layer and reaches budgets just below the smallest width's."""
    dim, low, step = model.head_dim, candidates[0], candidates[1] if len(candidates) > 1 else candidates[0]
    longer = []
    for base in bases:
        one_more = replace(_uniform(base, low), layer_bits=((step, low),) + ((low, low),) * (model.layers - 1))
        if base.key.axis == "channel" and one_more.average_bits(dim, dim) > budget_bits + 1e-9:
            variant = replace(base, key=replace(base.key, group_size=2 * base.key.group_size))
            if variant not in bases and variant not in longer:
                longer.append(variant)
    return longer


def calibrate_auto(
    model: Any,
    tokenizer: Any,
    budget_bits: float,
    bases: Sequence[str] = AUTO_BASES,
    candidates: Sequence[int] = DEFAULT_BITS,
    tokens: int = DEFAULT_TOKENS,
    data: str | os.PathLike[str] | None = None,
    model_name: str = "model",
    progress: bool = True,
) -> Profile:
    """The best cache config within `budget_bits` for `model`, chosen on the calibration text (what `auto-<budget>`
    specs resolve to): options as well as per-layer bits.

    Where every layer at the smallest width fills the budget (2.5 bits), `bases` are also tried with key groups of
    twice the length (`_longer_key_groups`). For each option set, the Fisher estimates (`fisher_table`, one forward
    and backward pass shared by all) allocate per-layer bits within the budget (`allocate`). The allocations, and
    every uniform spec of those options at the widest width within the budget (at 4.5 bits `k4v4`, at 3.5 `k3v3`,
    `k4v2` and `k2v4`), are then measured whole (`emulated_kl`, one forward each) and the lowest KL wins: the result
    is never worse, on the calibration text, than the best fixed spec of its width with those options. The profile
    records every candidate's measured KL (`Profile.choices`) and the winner's Fisher table.
    """
    candidates = tuple(sorted(set(candidates)))
    fingerprint = ProfileModel.of(model, model_name)
    dim = fingerprint.head_dim
    usable, skipped = [], []
    configs = [as_config(base) for base in bases]
    configs += _longer_key_groups(configs, candidates, budget_bits, fingerprint)
    for base_config in configs:  # before any model run: options that cannot fit this model or budget fail in seconds
        smallest = _uniform(base_config, candidates[0])
        try:
            check_head_dims(base_config, dim, dim, where=f"{base_config.spec}: ")
        except ShapeError as exc:
            skipped.append(str(exc))
            continue
        if smallest.average_bits(dim, dim) > budget_bits + 1e-9:
            skipped.append(f"{smallest.spec} needs {smallest.average_bits(dim, dim):g} bits per value")
            continue
        usable.append(base_config)
    if not usable:
        raise ConfigError(f"no option fits {budget_bits:g} bits per value on this model: {'; '.join(skipped)}.")
    path = Path(data) if data is not None else calibration_data_path()
    ids, sha256 = load_tokens(path, tokenizer, tokens)
    start = time.perf_counter()
    record = fisher_record(model, ids)
    # (config naming every layer's bits, its option set, that set's Fisher table, kind); allocations first.
    options: list[tuple[CacheConfig, CacheConfig, tuple[list[list[float]], list[list[float]]], str]] = []
    uniform = []
    memo: dict[Any, Any] = {}  # measurements option sets share are made once
    for base_config in usable:
        table = fisher_table(record, base_config, candidates, progress=False, memo=memo)
        allocation = allocate(*table, candidates, base_config, budget_bits, dim, dim)
        options.append((replace(base_config, layer_bits=allocation.layer_bits), base_config, table, "per layer"))
        uniform += [(replace(base_config, layer_bits=((k, v),) * record.layers), base_config, table, "uniform")
                    for k in candidates for v in candidates]  # fmt: skip
    fitting = [option for option in uniform if option[0].average_bits(dim, dim) <= budget_bits + 1e-9]
    widest = max((option[0].average_bits(dim, dim) for option in fitting), default=0.0)
    options += [option for option in fitting if abs(option[0].average_bits(dim, dim) - widest) < 1e-9]
    unique = list(dict.fromkeys(config for config, *_ in options))  # an allocation that is uniform runs once
    measured_unique = dict(zip(unique, emulated_kl(model, ids, unique, progress), strict=True))
    measured = [measured_unique[config] for config, *_ in options]
    best = min(range(len(options)), key=lambda i: (measured[i], i))
    config, base_config, (key_kl, value_kl), _ = options[best]
    choices = [
        {"base": b.spec, "kind": kind, "spec": c.for_layer(0).spec if kind == "uniform" else c.spec,
         "average_bits": c.average_bits(dim, dim), "kl": kl}
        for (c, b, _, kind), kl in zip(options, measured, strict=True)
    ]  # fmt: skip
    return Profile(
        config=config,
        base=base_config.spec,
        model=fingerprint,
        budget_bits=budget_bits,
        average_bits=config.average_bits(dim, dim),
        candidates=candidates,
        key_kl=key_kl,
        value_kl=value_kl,
        **_provenance(path, sha256, tokens, start),
        method="fisher",
        choices=choices,
    )


def reallocate(profile: Profile, budget_bits: float) -> Profile:
    """The profile of the same measurements allocated within another budget (no model run)."""
    dim = profile.model.head_dim
    base = replace(profile.config, layer_bits=())
    allocation = allocate(profile.key_kl, profile.value_kl, profile.candidates, base, budget_bits, dim, dim)
    return replace(
        profile,
        config=replace(base, layer_bits=allocation.layer_bits),
        budget_bits=budget_bits,
        average_bits=allocation.average_bits,
        choices=[],
        path=None,
    )
