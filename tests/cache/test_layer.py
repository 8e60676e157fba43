"""Unit tests of `PackedLayer` and `PackedSlidingLayer` on random `[batch, kv_heads, tokens, head_dim]` streams.

The oracle for every numeric check is exact: a token that the layer holds packed must come back as
`PackedTensor.quantize(its block).dequantize()`, bit for bit, and every other token must come back as it was
given. `Reference` builds that expectation from the whole input stream without looking at the layer, so
the layer's grouping, flushing and bookkeeping are checked against the rule written in the design
("the oldest whole blocks leave the residual window once it holds `residual + block` tokens").
Behaviour that transformers' own layers define (sequence length, mask sizes, sliding-window shapes, crop,
beam reordering) is checked against `DynamicLayer` / `DynamicSlidingWindowLayer` fed the same stream.
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Iterator

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import kvpack.errors
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer
from kvpack.cache.storage import GROWTH_TOKENS, PackedBuffer
from kvpack.config import CacheConfig, parse_spec
from kvpack.errors import (
    DtypeDeviceError,
    KVPackError,
    NonFiniteError,
    ShapeError,
    UnsupportedOperationError,
)
from kvpack.quant.tensor import PackedTensor

BATCH, HEADS, HEAD_DIM = 2, 3, 32


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# Configurations that exercise every code path of the layer with short streams: group 16 so packing starts
# after a few dozen tokens; residual 0 / 16 / 32; sinks; 2, 3, 4 and 8 bits; a key group larger than the value
# group (block_tokens 32); keys per token (block_tokens 1); values per channel (block from both specs).
SPECS = [
    "k8v8-g16-r0",
    "k4v2-plain-g16-r16-s4",
    "k3v3-plain-g16-r32",
    "k2v4-plain-gk32-gv16-r16-s3",
    "k4v4-plain-g16-r16-kt",
    "k4v8-plain-gk16-gv32-r0-s1-vc",
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# -- helpers -------------------------------------------------------------------------------------------------


def make_stream(
    tokens: int,
    *,
    batch: int = BATCH,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys (with an outlier channel, as real keys have) and values `[batch, heads, tokens, head_dim]`."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, head_dim, generator=gen) * 2
    keys[..., 3] += 8
    values = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    return keys.to(dtype), values.to(dtype)


def split_sizes(total: int, how: str, seed: int = 0) -> list[int]:
    """Chunk sizes that add up to `total`: one prefill, one token at a time, random chunks, or prefill + 1s."""
    if how == "prefill":
        return [total]
    if how == "single":
        return [1] * total
    if how == "prefill+single":
        first = total // 2
        return [first] + [1] * (total - first)
    assert how == "random"
    rng = random.Random(seed)
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(rng.choice([1, 1, 2, 3, 5, 7, 15, 16, 17, 31, 40]), total - sum(sizes)))
    return sizes


def feed(
    layer: PackedLayer | DynamicLayer, keys: torch.Tensor, values: torch.Tensor, sizes: list[int]
) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
    """Feed the stream in chunks of `sizes`; yields (tokens so far, chunk size, what update returned)."""
    end = 0
    for size in sizes:
        start, end = end, end + size
        out = layer.update(keys[:, :, start:end], values[:, :, start:end])
        yield end, size, out


class Reference:
    """What a layer must return after receiving the first `end` tokens of a stream, built without the layer.

    Sinks and the newest tokens exact; in between, every whole block of `block_tokens` tokens that has left the
    window of `residual` tokens, quantize-dequantized with `PackedTensor` (the one reference). Groups are
    independent, so the stream's packable tokens are quantized once here and each length takes a prefix.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, config: CacheConfig):
        self.keys, self.values, self.config = keys, values, config
        sinks = min(config.sinks, keys.shape[2])
        packable = (keys.shape[2] - sinks) // config.block_tokens * config.block_tokens
        part = slice(sinks, sinks + packable)
        self.q_keys, self.q_values = keys.clone(), values.clone()
        if packable:
            self.q_keys[:, :, part] = PackedTensor.quantize(keys[:, :, part], config.key).dequantize(keys.dtype)
            self.q_values[:, :, part] = PackedTensor.quantize(values[:, :, part], config.value).dequantize(values.dtype)

    def packed(self, end: int) -> int:
        """Tokens packed after `end` tokens: whole blocks beyond the sinks and the `residual` newest tokens."""
        sinks = min(self.config.sinks, end)
        return max(end - sinks - self.config.residual, 0) // self.config.block_tokens * self.config.block_tokens

    def dense(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        split = min(self.config.sinks, end) + self.packed(end)
        return (
            torch.cat([self.q_keys[:, :, :split], self.keys[:, :, split:end]], dim=2),
            torch.cat([self.q_values[:, :, :split], self.values[:, :, split:end]], dim=2),
        )

    def returned(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What `update` of tokens `[start, end)` returns: the past as stored after `start` tokens, then the new
        tokens exactly as given (a prefill or a chunk attends to itself in full precision)."""
        past_keys, past_values = self.dense(start)
        return (
            torch.cat([past_keys, self.keys[:, :, start:end]], dim=2),
            torch.cat([past_values, self.values[:, :, start:end]], dim=2),
        )


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` (so NaN compares equal to the same NaN, and -0.0 differs from 0.0)."""
    return t.detach().contiguous().clone().view(torch.uint8)


def layer_state(layer: PackedLayer, raw: bool = False) -> dict[str, object]:
    """Everything the layer holds, as comparable values: lengths, and the bytes of the valid data.

    raw=True also takes the whole buffers, unused capacity included (to prove that nothing was written).
    """
    state: dict[str, object] = {
        "initialized": layer.is_initialized,
        "seen": layer.seen_tokens,
        "sink_len": layer.sink_len,
        "residual_len": layer.residual_len,
        "packed_len": layer.packed_length,
        "nbytes": layer.nbytes(),
        "seq_length": layer.get_seq_length(),
    }
    if not layer.is_initialized:
        return state
    assert layer.packed_keys is not None and layer.packed_values is not None
    state["sink_keys"] = as_bits(layer.sink_keys[:, :, : layer.sink_len])
    state["sink_values"] = as_bits(layer.sink_values[:, :, : layer.sink_len])
    state["residual_keys"] = as_bits(layer.residual_keys[:, :, : layer.residual_len])
    state["residual_values"] = as_bits(layer.residual_values[:, :, : layer.residual_len])
    for name, buffer in (("packed_keys", layer.packed_keys), ("packed_values", layer.packed_values)):
        view = buffer.view()
        for part in ("codes", "scale", "zero"):
            state[f"{name}.{part}"] = as_bits(getattr(view, part))
        state[f"{name}.shape"] = tuple(view.shape)
    if raw:
        for name, tensor in vars(layer).items():
            if isinstance(tensor, torch.Tensor):
                state[f"raw.{name}"] = as_bits(tensor)
        for name, buffer in (("packed_keys", layer.packed_keys), ("packed_values", layer.packed_values)):
            for part in ("codes", "scale", "zero"):
                state[f"raw.{name}.{part}"] = as_bits(getattr(buffer, part))
    return state


def assert_same_state(
    actual: dict[str, object], expected: dict[str, object], skip: tuple[str, ...] = (), context: str = ""
) -> None:
    assert actual.keys() == expected.keys(), context
    for name in actual:
        if name in skip:
            continue
        a, e = actual[name], expected[name]
        if isinstance(a, torch.Tensor):
            assert isinstance(e, torch.Tensor)
            assert a.shape == e.shape and torch.equal(a, e), f"{context} {name} differs"
        else:
            assert a == e, f"{context} {name}: {a} != {e}"


def held_tensors(layer: PackedLayer) -> list[torch.Tensor]:
    """Every tensor the layer object holds: its own tensor attributes and those of its packed buffers."""
    found: list[torch.Tensor] = []
    for value in vars(layer).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, PackedBuffer):
            found += [t for t in vars(value).values() if isinstance(t, torch.Tensor)]
    return found


VIEWS_OF_EXACT = {"sink_keys": "exact_keys", "residual_keys": "exact_keys", "sink_values": "exact_values",
                  "residual_values": "exact_values"}  # fmt: skip


def walked_nbytes(layer: PackedLayer) -> int:
    """Bytes of every held tensor; the sinks and the residual window are views of `exact_*`, counted there."""
    for view, buffer in VIEWS_OF_EXACT.items():
        held = getattr(layer, view)
        assert (
            held.numel() == 0
            or held.untyped_storage().data_ptr() == getattr(layer, buffer).untyped_storage().data_ptr()
        )
    skipped = {id(getattr(layer, view)) for view in VIEWS_OF_EXACT}
    return sum(t.numel() * t.element_size() for t in held_tensors(layer) if id(t) not in skipped)


def storage_nbytes(layer: PackedLayer) -> int:
    """Bytes of the distinct storages behind those tensors: what the process really keeps alive for the layer."""
    storages = {}
    for t in held_tensors(layer):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# -- packed data is written once -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["single", "random"])
@pytest.mark.parametrize("spec", SPECS)
def test_packed_bytes_of_old_groups_never_change(spec: str, how: str) -> None:
    config = parse_spec(spec)
    keys, values = make_stream(150)
    layer = PackedLayer(config)
    previous: dict[str, torch.Tensor] = {}
    for _ in feed(layer, keys, values, split_sizes(150, how, seed=1)):
        assert layer.packed_keys is not None and layer.packed_values is not None
        current = {}
        for name, buffer in (("k", layer.packed_keys), ("v", layer.packed_values)):
            view = buffer.view()
            for part in ("codes", "scale", "zero"):
                current[f"{name}.{part}"] = getattr(view, part).clone()
        for name, old in previous.items():
            now = current[name]
            assert now.shape[2] >= old.shape[2], f"{name}: packed data shrank"
            assert torch.equal(as_bits(now[:, :, : old.shape[2]]), as_bits(old)), f"{name}: old group re-written"
        previous = current
    assert layer.packed_length > 0, "the stream is long enough that packing must have happened"


# -- what comes back ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("how", ["prefill", "single", "random", "prefill+single"])
@pytest.mark.parametrize("spec", SPECS)
def test_update_returns_exact_residual_and_sinks_and_reference_quantized_past(
    spec: str, how: str, dtype: torch.dtype
) -> None:
    config = parse_spec(spec)
    total = 130
    keys, values = make_stream(total, dtype=dtype, seed=2)
    layer = PackedLayer(config)
    reference = Reference(keys, values, config)
    for end, size, (out_keys, out_values) in feed(layer, keys, values, split_sizes(total, how, seed=3)):
        ret_keys, ret_values = reference.returned(end - size, end)
        assert out_keys.dtype == dtype and out_values.dtype == dtype
        assert torch.equal(as_bits(out_keys), as_bits(ret_keys))
        assert torch.equal(as_bits(out_values), as_bits(ret_values))
        # What the layer now holds: the reference after `end` tokens.
        out_keys, out_values = layer.dense()
        exp_keys, exp_values = reference.dense(end)
        assert torch.equal(as_bits(out_keys), as_bits(exp_keys))
        assert torch.equal(as_bits(out_values), as_bits(exp_values))
        packed = reference.packed(end)
        assert layer.packed_length == packed
        # The newest `residual` tokens (and the sinks) are held exactly, never quantized.
        assert layer.sink_len == min(config.sinks, end)
        assert layer.residual_len >= min(config.residual, end - layer.sink_len)
        exact = min(config.residual, end)
        assert torch.equal(out_keys[:, :, end - exact :], keys[:, :, end - exact : end])
        assert torch.equal(out_values[:, :, end - exact :], values[:, :, end - exact : end])
        assert torch.equal(out_keys[:, :, : layer.sink_len], keys[:, :, : layer.sink_len])
    assert layer.packed_length > 0


@pytest.mark.parametrize("residual", [0, 16, 32])
def test_long_prefill_keeps_last_residual_tokens_exact(residual: int) -> None:
    config = parse_spec(f"k2v2-plain-g16-r{residual}")
    keys, values = make_stream(1000, seed=4)
    layer = PackedLayer(config)
    returned_keys, returned_values = layer.update(keys, values)
    assert torch.equal(returned_keys, keys) and torch.equal(returned_values, values)  # the prefill attends exactly
    out_keys, out_values = layer.dense()
    assert layer.residual_len >= residual
    assert layer.packed_length == (1000 - residual) // 16 * 16
    assert torch.equal(out_keys[:, :, 1000 - residual :], keys[:, :, 1000 - residual :])
    assert torch.equal(out_values[:, :, 1000 - residual :], values[:, :, 1000 - residual :])
    # ...and what was packed really is quantized (2 bits cannot be exact on Gaussian data).
    packed = layer.packed_length
    assert not torch.equal(out_keys[:, :, :packed], keys[:, :, :packed])


def test_packed_error_within_half_a_step_of_the_stored_scale() -> None:
    """A sanity bound on top of the exact reference: each packed element is within half a step of its input.

    The slack is float32 rounding of the reference arithmetic (relative ~1e-7), far below half a step.
    """
    config = parse_spec("k4v4-plain-g16-r16")
    keys, values = make_stream(100, seed=5)
    layer = PackedLayer(config)
    layer.update(keys, values)
    out_keys, out_values = layer.dense()
    assert layer.packed_keys is not None and layer.packed_values is not None
    packed = layer.packed_length
    key_scale = layer.packed_keys.view().scale.float().repeat_interleave(16, dim=2)  # [b, h, tokens, channels]
    value_scale = layer.packed_values.view().scale.float().repeat_interleave(16, dim=3)
    for out, inp, scale in ((out_keys, keys, key_scale), (out_values, values, value_scale)):
        err = (out[:, :, :packed] - inp[:, :, :packed]).abs()
        slack = 1e-6 * inp[:, :, :packed].abs() + 1e-6
        assert (err <= scale / 2 + slack).all()


# -- grouping does not depend on how tokens arrive -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_chunking_does_not_change_stored_state_or_outputs(spec: str, dtype: torch.dtype) -> None:
    config = parse_spec(spec)
    total = 140
    keys, values = make_stream(total, dtype=dtype, seed=6)
    finals = {}
    outputs_at: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for how, seed in (("prefill", 0), ("single", 0), ("random", 7), ("random", 8), ("prefill+single", 0)):
        layer = PackedLayer(config)
        name = f"{how}/{seed}"
        # What the layer holds after each call (its returns differ by design: each chunk attends to itself exactly).
        outputs_at[name] = {
            end: layer.dense() for end, _, _ in feed(layer, keys, values, split_sizes(total, how, seed))
        }
        # Capacity depends on the growth history, so compare the valid data and not nbytes.
        finals[name] = layer_state(layer)
    for name, state in finals.items():
        assert_same_state(state, finals["single/0"], skip=("nbytes",), context=name)
    # Outputs at every length reached by two schedules agree bit for bit.
    single = outputs_at["single/0"]
    for name, outs in outputs_at.items():
        for end, (out_keys, out_values) in outs.items():
            assert torch.equal(as_bits(out_keys), as_bits(single[end][0])), f"{name} at {end}"
            assert torch.equal(as_bits(out_values), as_bits(single[end][1])), f"{name} at {end}"


def test_zero_token_update_and_early_initialization_change_nothing() -> None:
    config = parse_spec("k4v4-plain-g16-r16-s2")
    keys, values = make_stream(60, seed=9)
    plain = PackedLayer(config)
    list(feed(plain, keys, values, [30, 30]))

    layer = PackedLayer(config)
    empty = keys[:, :, :0]
    layer.lazy_initialization(empty, empty)  # what Cache.early_initialization does
    layer.update(keys[:, :, :30], values[:, :, :30])
    layer.update(empty, empty)
    layer.update(keys[:, :, 30:], values[:, :, 30:])
    assert_same_state(layer_state(layer), layer_state(plain))


# -- exact memory accounting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["k4v2-plain-g16-r16-s4", "k3v3-plain-g16-r0", "k4v4-plain-g16-r16-kt"])
def test_nbytes_is_the_sum_of_every_held_tensor_through_growth(spec: str) -> None:
    config = parse_spec(spec)
    total = 40 + 2 * GROWTH_TOKENS + 60
    keys, values = make_stream(total, batch=1, heads=2, seed=10)
    layer = PackedLayer(config)
    assert layer.nbytes() == 0
    assert layer.packed_keys is None
    pointers: tuple[int, int] | None = None
    exact_pointer: int | None = None
    reallocations = exact_reallocations = 0
    end = 0
    for size in [40] + [1] * (total - 40):
        nbytes_before = layer.nbytes()
        layer.append(keys[:, :, end : end + size], values[:, :, end : end + size])
        end += size
        assert layer.nbytes() == walked_nbytes(layer)
        assert layer.nbytes() == storage_nbytes(layer)
        assert layer.packed_keys is not None and layer.packed_values is not None
        now = (layer.packed_keys.codes.data_ptr(), layer.packed_values.codes.data_ptr())
        exact_now = layer.exact_keys.data_ptr()
        moved = now != pointers or exact_now != exact_pointer
        reallocations += now != pointers
        exact_reallocations += exact_now != exact_pointer
        pointers, exact_pointer = now, exact_now
        if not moved and end > 40:
            # Appending in place: the bytes held move only when a buffer is reallocated.
            assert layer.nbytes() == nbytes_before
    assert layer.packed_length > 2 * GROWTH_TOKENS
    # Storage grows by chunks of >= GROWTH_TOKENS tokens: no decode step copies the whole cache.
    assert reallocations <= 2 * (total // GROWTH_TOKENS + 2)
    # The exact buffer grows as it fills, at least doubling, and stops at sinks + residual + block tokens.
    full = config.sinks + config.residual + config.block_tokens
    assert layer.sink_len + layer.residual_len <= layer.exact_keys.shape[2] <= full
    assert exact_reallocations <= math.ceil(math.log2(full)) + 1


def test_nbytes_after_batch_operations_and_reset() -> None:
    config = parse_spec("k4v4-plain-g16-r16-s2")
    keys, values = make_stream(70, batch=3, seed=11)
    layer = PackedLayer(config)
    layer.update(keys, values)
    for op in (
        lambda: layer.reorder_cache(torch.tensor([2, 0, 2])),
        lambda: layer.batch_repeat_interleave(2),
        lambda: layer.batch_select_indices(torch.tensor([0, 3, 5])),
    ):
        op()
        assert layer.nbytes() == walked_nbytes(layer) == storage_nbytes(layer)
    layer.reset()
    assert layer.nbytes() == 0 == walked_nbytes(layer)


@pytest.mark.parametrize("window", [None, 17])
def test_fp16_nbytes_is_what_a_float16_dynamic_layer_holds(window: int | None) -> None:
    config = parse_spec("k4v4-plain-g16-r16")
    keys, values = make_stream(90, seed=12)
    layer = PackedLayer(config) if window is None else PackedSlidingLayer(config, sliding_window=window)
    ref = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    assert layer.fp16_nbytes() == 0
    for end, size, _ in feed(layer, keys, values, [30] + [1] * 60):
        ref.update(keys[:, :, end - size : end].half(), values[:, :, end - size : end].half())
        assert ref.keys is not None and ref.values is not None
        assert layer.fp16_nbytes() == ref.keys.numel() * 2 + ref.values.numel() * 2


# -- agreement with transformers' DynamicLayer --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["prefill+single", "random"])
@pytest.mark.parametrize("spec", ["k4v4-plain-g16-r0", "k4v4-plain-g16-r16-s4", "k8v8-g16-r32"])
def test_seq_length_and_mask_sizes_match_dynamic_layer(spec: str, how: str) -> None:
    keys, values = make_stream(120, seed=13)
    layer, ref = PackedLayer(parse_spec(spec)), DynamicLayer()
    assert layer.get_seq_length() == ref.get_seq_length() == 0
    assert layer.get_mask_sizes(5) == ref.get_mask_sizes(5)
    for end, size, out in feed(layer, keys, values, split_sizes(120, how, seed=14)):
        ref_out = ref.update(keys[:, :, end - size : end], values[:, :, end - size : end])
        assert out[0].shape == ref_out[0].shape and out[1].shape == ref_out[1].shape
        assert layer.get_seq_length() == ref.get_seq_length() == end
        for query_length in (1, 4):
            assert layer.get_mask_sizes(query_length) == ref.get_mask_sizes(query_length)
    assert layer.get_max_length() == ref.get_max_length() == -1
    assert layer.is_sliding is False


# -- sliding-window layers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", ["shorter", "longer"])
@pytest.mark.parametrize("residual", [0, 16, 32])
@pytest.mark.parametrize("window", [5, 17, 100])
def test_sliding_layer_matches_dynamic_sliding_window_layer(window: int, residual: int, prefill: str) -> None:
    config = parse_spec(f"k4v4-plain-g16-r{residual}")
    prefill_len = max(window // 2, 2) if prefill == "shorter" else window + 37
    steps = 50
    keys, values = make_stream(prefill_len + steps, seed=15)
    layer = PackedSlidingLayer(config, sliding_window=window)
    ref = DynamicSlidingWindowLayer(sliding_window=window)
    assert layer.is_sliding and ref.is_sliding
    assert layer.get_max_length() == ref.get_max_length() == window
    reference = Reference(keys, values, config)
    for end, size, (out_keys, out_values) in feed(layer, keys, values, [prefill_len] + [1] * steps):
        ref_keys, ref_values = ref.update(keys[:, :, end - size : end], values[:, :, end - size : end])
        assert out_keys.shape == ref_keys.shape and out_values.shape == ref_values.shape
        assert layer.get_seq_length() == ref.get_seq_length() == end
        # What transformers asks before the next update, with the new tokens as the query.
        for query_length in (1, 3):
            assert layer.get_mask_sizes(query_length) == ref.get_mask_sizes(query_length)
        # Exact reference of the whole stream (the past as stored, the new tokens exact), cut to the window.
        exp_keys, exp_values = reference.returned(end - size, end)
        visible = out_keys.shape[2]
        assert torch.equal(out_keys, exp_keys[:, :, end - visible :])
        assert torch.equal(out_values, exp_values[:, :, end - visible :])
        # The residual part is exactly what DynamicSlidingWindowLayer returns.
        exact = min(layer.residual_len, visible)
        assert exact >= min(residual, visible)
        assert torch.equal(out_keys[:, :, visible - exact :], ref_keys[:, :, visible - exact :])
        assert torch.equal(out_values[:, :, visible - exact :], ref_values[:, :, visible - exact :])


@pytest.mark.parametrize("residual", [0, 16])
def test_sliding_layer_memory_stays_bounded(residual: int) -> None:
    window, block = 17, 16
    config = parse_spec(f"k4v4-plain-g16-r{residual}")
    keys, values = make_stream(600, batch=1, seed=16)
    layer = PackedSlidingLayer(config, sliding_window=window)
    sizes = []
    for end, _, _ in feed(layer, keys, values, [20] + [1] * 580):
        assert layer.stored_tokens() <= window - 1 + residual + 2 * block
        assert layer.nbytes() == walked_nbytes(layer)
        if end > 300:
            sizes.append(layer.nbytes())
    assert len(set(sizes)) == 1, "a sliding layer's memory must stop growing once the window is full"


@pytest.mark.parametrize("window", [5, 100])
def test_sliding_layer_chunking_does_not_change_state(window: int) -> None:
    config = parse_spec("k4v4-plain-g16-r16")
    keys, values = make_stream(180, seed=17)
    states, lasts = {}, {}
    for how, seed in (("single", 0), ("random", 18), ("prefill+single", 0)):
        sizes = [*split_sizes(179, how, seed), 1]
        layer = PackedSlidingLayer(config, sliding_window=window)
        *_, (_, _, last) = feed(layer, keys, values, sizes)
        states[how], lasts[how] = layer_state(layer), last
    for how in states:
        assert_same_state(states[how], states["single"], skip=("nbytes",))
        assert torch.equal(lasts[how][0], lasts["single"][0]) and torch.equal(lasts[how][1], lasts["single"][1])


def test_sliding_layer_ignores_sinks() -> None:
    keys, values = make_stream(80, seed=19)
    with_sinks = PackedSlidingLayer(parse_spec("k4v4-plain-g16-r16-s4"), sliding_window=17)
    without = PackedSlidingLayer(parse_spec("k4v4-plain-g16-r16"), sliding_window=17)
    assert with_sinks.config.sinks == 0
    outs_a = [out for *_, out in feed(with_sinks, keys, values, [30] + [1] * 50)]
    outs_b = [out for *_, out in feed(without, keys, values, [30] + [1] * 50)]
    for a, b in zip(outs_a, outs_b, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("window", [5, 17, 100])
def test_sliding_layer_crop_matches_recording_dynamic_sliding_window_layer(window: int) -> None:
    """Assisted decoding: feed candidates, roll some back, go on; shapes, masks and exact part as transformers."""
    config = parse_spec("k4v4-plain-g16-r16")
    keys, values = make_stream(400, seed=20)
    layer = PackedSlidingLayer(config, sliding_window=window)
    ref = DynamicSlidingWindowLayer(sliding_window=window)
    layer.activate_past_recording()
    ref.activate_past_recording()
    pos = 0
    # (tokens appended, tokens then rolled back)
    for appended, rolled_back in [(window + 20, 0), (4, 3), (4, 0), (4, 2), (1, 0), (4, 4), (1, 0), (3, 1)] * 3:
        k, v = keys[:, :, pos : pos + appended], values[:, :, pos : pos + appended]
        assert layer.get_mask_sizes(appended) == ref.get_mask_sizes(appended)
        out_keys, out_values = layer.update(k, v)
        ref_keys, ref_values = ref.update(k, v)
        assert out_keys.shape == ref_keys.shape
        exact = min(layer.residual_len, out_keys.shape[2])
        n = out_keys.shape[2]
        assert torch.equal(out_keys[:, :, n - exact :], ref_keys[:, :, n - exact :])
        assert torch.equal(out_values[:, :, n - exact :], ref_values[:, :, n - exact :])
        layer.crop(-rolled_back)
        ref.crop(-rolled_back)
        pos += appended - rolled_back
        assert layer.get_seq_length() == ref.get_seq_length() == pos
        # The whole layer (kept data) still equals the reference of the kept stream, cut to the window.
        dense_keys, dense_values = layer.dense()
        tail = layer.residual_len
        assert torch.equal(dense_keys[:, :, dense_keys.shape[2] - tail :], keys[:, :, pos - tail : pos])
        assert torch.equal(dense_values[:, :, dense_values.shape[2] - tail :], values[:, :, pos - tail : pos])


def test_sliding_layer_positive_crop_raises() -> None:
    layer = PackedSlidingLayer(parse_spec("k4v4-plain-g16-r16"), sliding_window=8)
    keys, values = make_stream(20, seed=21)
    layer.update(keys, values)
    before = layer_state(layer, raw=True)
    with pytest.raises(UnsupportedOperationError):
        layer.crop(10)
    assert_same_state(layer_state(layer, raw=True), before)


# -- crop --------------------------------------------------------------------------------------------------------


def _stream_with_residual(residual_len: int, sinks: int = 0, block: int = 16, residual: int = 16) -> int:
    """A stream length for which a fresh layer holds `residual_len` residual tokens after 3 packed blocks."""
    assert residual <= residual_len < residual + block
    return sinks + 3 * block + residual_len


@pytest.mark.parametrize("remove", [1, 5, 11])
def test_crop_within_the_extra_residual_equals_feeding_only_the_kept_tokens(remove: int) -> None:
    config = parse_spec("k4v4-plain-g16-r16-s2")
    total = _stream_with_residual(27, sinks=2)
    keys, values = make_stream(total + 40, seed=22)
    layer, ref = PackedLayer(config), DynamicLayer()
    layer.update(keys[:, :, :total], values[:, :, :total])
    ref.update(keys[:, :, :total], values[:, :, :total])
    assert layer.residual_len == 27 and layer.packed_length == 48
    layer.crop(-remove)
    ref.crop(-remove)
    kept = total - remove
    assert layer.get_seq_length() == ref.get_seq_length() == kept
    assert layer.get_mask_sizes(1) == ref.get_mask_sizes(1)
    fresh = PackedLayer(config)
    fresh.update(keys[:, :, :kept], values[:, :, :kept])
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))
    dense_keys, _ = layer.dense()
    assert dense_keys.shape == ref.keys.shape
    # Going on after the rollback is the same as never having seen the removed tokens.
    sizes = [1] * 20 + [20]
    new_keys, new_values = keys[:, :, total : total + 40], values[:, :, total : total + 40]
    for (_, _, a), (_, _, b) in zip(
        feed(layer, new_keys, new_values, sizes), feed(fresh, new_keys, new_values, sizes), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("remove", [12, 20, 27])
def test_crop_of_the_whole_residual_removes_exactly_the_newest_tokens(remove: int) -> None:
    config = parse_spec("k4v4-plain-g16-r16")
    total = _stream_with_residual(27)
    keys, values = make_stream(total + 40, seed=23)
    layer, ref = PackedLayer(config), DynamicLayer()
    layer.update(keys[:, :, :total], values[:, :, :total])
    before_keys, before_values = layer.dense()
    ref.update(keys[:, :, :total], values[:, :, :total])
    layer.crop(-remove)
    ref.crop(-remove)
    kept = total - remove
    assert layer.get_seq_length() == ref.get_seq_length() == kept
    assert layer.get_mask_sizes(3) == ref.get_mask_sizes(3)
    dense_keys, dense_values = layer.dense()
    assert torch.equal(dense_keys, before_keys[:, :, :kept])
    assert torch.equal(dense_values, before_values[:, :, :kept])
    # After residual + block more tokens, the layer holds exactly what a never-rolled-back layer holds.
    fresh = PackedLayer(config)
    fresh.update(keys[:, :, :kept], values[:, :, :kept])
    more = 32
    list(feed(layer, keys[:, :, total : total + more], values[:, :, total : total + more], [1] * more))
    list(feed(fresh, keys[:, :, total : total + more], values[:, :, total : total + more], [1] * more))
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))


def test_rollback_of_candidates_that_triggered_packing_equals_feeding_only_the_kept_tokens() -> None:
    """Assisted decoding: 4 candidate tokens arrive, 3 are rejected (crop(-3) <= residual_len, so allowed)."""
    config = parse_spec("k4v4-plain-g16-r16")
    total = _stream_with_residual(30)
    keys, values = make_stream(total + 4, seed=24)
    layer = PackedLayer(config)
    layer.activate_past_recording()  # what transformers does before assisted / prompt-lookup decoding
    layer.update(keys[:, :, :total], values[:, :, :total])
    layer.update(keys[:, :, total:], values[:, :, total:])  # 34 residual tokens >= 16 + 16: one block packed
    layer.crop(-3)
    kept = total + 1
    fresh = PackedLayer(config)
    fresh.update(keys[:, :, :kept], values[:, :, :kept])
    assert layer.residual_len >= config.residual
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))


def test_past_recording_takes_the_keywords_transformers_passes() -> None:
    """transformers >= 5.25 passes `recurrent_states_to_keep` (the candidate tokens a crop may remove): accepted up
    to the residual window, which rolls back exactly, and refused beyond it before anything changes."""
    config = parse_spec("k4v4-plain-g16-r16")
    for layer in (PackedLayer(config), PackedSlidingLayer(config, sliding_window=64)):
        layer.activate_past_recording(recurrent_states_to_keep=16, some_future_keyword=True)
        assert layer.record_past
        fresh = PackedLayer(config)
        with pytest.raises(UnsupportedOperationError, match="-r17") as info:
            fresh.activate_past_recording(recurrent_states_to_keep=17)
        assert isinstance(info.value, KVPackError)
        assert not fresh.record_past


def test_crop_that_reaches_packed_tokens_raises_and_changes_nothing() -> None:
    config = parse_spec("k4v4-plain-g16-r16-s2")
    total = _stream_with_residual(20, sinks=2)
    keys, values = make_stream(total, seed=25)
    layer = PackedLayer(config)
    layer.update(keys, values)
    before = layer_state(layer, raw=True)
    for remove in (21, 40, total):
        with pytest.raises(UnsupportedOperationError, match="crop") as info:
            layer.crop(-remove)
        assert isinstance(info.value, KVPackError)
        assert "-r" in str(info.value)  # says what to do: a longer residual window
        assert_same_state(layer_state(layer, raw=True), before)
    layer.crop(-20)  # the whole residual is fine
    assert layer.get_seq_length() == total - 20


def test_crop_into_sinks_before_anything_is_packed() -> None:
    config = parse_spec("k4v4-plain-g16-r16-s4")
    keys, values = make_stream(60, seed=26)
    layer, ref = PackedLayer(config), DynamicLayer()
    layer.update(keys[:, :, :10], values[:, :, :10])
    ref.update(keys[:, :, :10], values[:, :, :10])
    layer.crop(-8)
    ref.crop(-8)
    assert layer.get_seq_length() == ref.get_seq_length() == 2
    fresh = PackedLayer(config)
    fresh.update(keys[:, :, :2], values[:, :, :2])
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))
    a = layer.update(keys[:, :, 10:], values[:, :, 10:])
    b = fresh.update(keys[:, :, 10:], values[:, :, 10:])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_crop_zero_and_legacy_keep_length() -> None:
    config = parse_spec("k4v4-plain-g16-r16")
    keys, values = make_stream(70, seed=27)
    layer = PackedLayer(config)
    layer.update(keys, values)
    before = layer_state(layer, raw=True)
    layer.crop(0)
    assert_same_state(layer_state(layer, raw=True), before)
    layer.crop(70)  # a positive value is the length to keep (documented legacy form)
    assert_same_state(layer_state(layer, raw=True), before)
    layer.crop(60)
    assert layer.get_seq_length() == 60
    PackedLayer(config).crop(-3)  # uninitialized: nothing to do, like DynamicLayer


# -- beams and batch selection ----------------------------------------------------------------------------------


BATCH_OPS = {
    "reorder_cache": (lambda layer: layer.reorder_cache(torch.tensor([2, 0, 2])), lambda t: t[[2, 0, 2]]),
    "batch_select_indices": (lambda layer: layer.batch_select_indices(torch.tensor([0, 2])), lambda t: t[[0, 2]]),
    "batch_repeat_interleave": (
        lambda layer: layer.batch_repeat_interleave(2),
        lambda t: t.repeat_interleave(2, dim=0),
    ),
}


@pytest.mark.parametrize("op", list(BATCH_OPS))
@pytest.mark.parametrize("spec", ["k4v2-plain-g16-r16-s4", "k8v8-g16-r0", "k4v4-plain-gk32-gv16-r32-kt"])
def test_batch_operations_equal_feeding_the_transformed_inputs(spec: str, op: str) -> None:
    config = parse_spec(spec)
    apply_to_layer, apply_to_tensor = BATCH_OPS[op]
    keys, values = make_stream(110, batch=3, seed=28)
    layer, dynamic = PackedLayer(config), DynamicLayer()
    list(feed(layer, keys[:, :, :90], values[:, :, :90], [61] + [1] * 29))
    dynamic.update(keys[:, :, :90], values[:, :, :90])
    assert layer.packed_length > 0 and layer.residual_len > 0
    apply_to_layer(layer)
    apply_to_layer(dynamic)
    fresh = PackedLayer(config)
    t_keys, t_values = apply_to_tensor(keys), apply_to_tensor(values)
    list(feed(fresh, t_keys[:, :, :90], t_values[:, :, :90], [61] + [1] * 29))
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))
    dense_keys, _ = layer.dense()
    assert dense_keys.shape == dynamic.keys.shape
    assert layer.get_seq_length() == dynamic.get_seq_length()
    # The next steps (new tokens for the new batch) agree too.
    sizes = [1] * 20
    for (_, _, a), (_, _, b) in zip(
        feed(layer, t_keys[:, :, 90:], t_values[:, :, 90:], sizes),
        feed(fresh, t_keys[:, :, 90:], t_values[:, :, 90:], sizes),
        strict=True,
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("op", list(BATCH_OPS))
def test_batch_operations_on_sliding_layer(op: str) -> None:
    config = parse_spec("k4v4-plain-g16-r16")
    apply_to_layer, apply_to_tensor = BATCH_OPS[op]
    keys, values = make_stream(120, batch=3, seed=29)
    layer = PackedSlidingLayer(config, sliding_window=17)
    list(feed(layer, keys[:, :, :100], values[:, :, :100], [70] + [1] * 30))
    apply_to_layer(layer)
    fresh = PackedSlidingLayer(config, sliding_window=17)
    t_keys, t_values = apply_to_tensor(keys), apply_to_tensor(values)
    list(feed(fresh, t_keys[:, :, :100], t_values[:, :, :100], [70] + [1] * 30))
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))
    a = layer.update(t_keys[:, :, 100:], t_values[:, :, 100:])
    b = fresh.update(t_keys[:, :, 100:], t_values[:, :, 100:])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_operations_before_any_token_are_no_ops() -> None:
    layer = PackedLayer(parse_spec("k4v4-plain-g16-r16"))
    layer.reorder_cache(torch.tensor([0]))
    layer.batch_select_indices(torch.tensor([0]))
    layer.batch_repeat_interleave(3)
    assert layer.get_seq_length() == 0 and not layer.is_initialized


# -- reset -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sliding", [False, True])
def test_reset_empties_the_layer_for_reuse_with_another_batch_and_dtype(sliding: bool) -> None:
    config = parse_spec("k4v4-plain-g16-r16-s2")

    def new_layer() -> PackedLayer:
        return PackedSlidingLayer(config, sliding_window=9) if sliding else PackedLayer(config)

    layer = new_layer()
    keys, values = make_stream(80, batch=2, seed=30)
    list(feed(layer, keys, values, [50] + [1] * 30))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0 and layer.fp16_nbytes() == 0
    assert not layer.is_initialized and layer.packed_length == 0
    assert layer.get_mask_sizes(4) == (4, 0)

    keys, values = make_stream(80, batch=5, heads=1, head_dim=64, dtype=torch.bfloat16, seed=31)
    fresh = new_layer()
    for (_, _, a), (_, _, b) in zip(
        feed(layer, keys, values, [40] + [1] * 40), feed(fresh, keys, values, [40] + [1] * 40), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_same_state(layer_state(layer), layer_state(fresh), skip=("nbytes",))


# -- bad input ---------------------------------------------------------------------------------------------------


def _populated_layer(spec: str = "k4v4-plain-g16-r16-s2") -> tuple[PackedLayer, torch.Tensor, torch.Tensor]:
    keys, values = make_stream(120, seed=32)
    layer = PackedLayer(parse_spec(spec))
    layer.update(keys[:, :, :60], values[:, :, :60])
    assert layer.packed_length > 0
    return layer, keys, values


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda t: t.to(torch.bfloat16), id="dtype"),
        pytest.param(lambda t: t.double(), id="float64"),
        pytest.param(lambda t: t.to("meta"), id="device"),
    ],
)
def test_dtype_or_device_change_after_init_raises_and_changes_nothing(change) -> None:
    layer, keys, values = _populated_layer()
    before = layer_state(layer, raw=True)
    for k, v in ((change(keys[:, :, 60:61]), values[:, :, 60:61]), (keys[:, :, 60:61], change(values[:, :, 60:61]))):
        with pytest.raises(DtypeDeviceError, match="layer 0") as info:
            layer.update(k, v)
        assert "reset" in str(info.value)
        assert_same_state(layer_state(layer, raw=True), before)
    layer.update(keys[:, :, 60:61], values[:, :, 60:61])  # still usable


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_unsupported_dtype_at_init_raises(dtype: torch.dtype) -> None:
    layer = PackedLayer(parse_spec("k4v4-plain-g16-r16"))
    keys = torch.ones(1, 2, 4, 32, dtype=dtype)
    with pytest.raises(DtypeDeviceError, match="float32, float16 or bfloat16"):
        layer.update(keys, keys)
    assert not layer.is_initialized
    good_keys, good_values = make_stream(4)
    layer.update(good_keys, good_values)
    assert layer.get_seq_length() == 4


def test_keys_and_values_of_different_dtypes_raise() -> None:
    layer = PackedLayer(parse_spec("k4v4-plain-g16-r16"))
    keys, values = make_stream(4)
    with pytest.raises(DtypeDeviceError):
        layer.update(keys, values.half())


# A suggested option is quoted ('-g16'); the message also names the layer's own spec, unquoted.
SUGGESTION = re.compile(r"'-g(\d+)'")


@pytest.mark.parametrize(
    ("spec", "head_dim", "which"),
    [
        ("k4v4-plain-g32-r16", 48, "value"),
        ("k4v4-plain-g64-r16", 80, "value"),
        ("k4v4-plain-g32-r16-kt", 48, "key"),
    ],
)
def test_head_dim_not_divisible_by_group_raises_with_a_usable_suggestion(spec: str, head_dim: int, which: str) -> None:
    layer = PackedLayer(parse_spec(spec))
    keys, values = make_stream(4, head_dim=head_dim)
    with pytest.raises(ShapeError) as info:
        layer.update(keys, values)
    message = str(info.value)
    assert f"head_dim {head_dim}" in message and which in message and "group size" in message
    assert not layer.is_initialized
    suggested = [int(g) for g in SUGGESTION.findall(message)]
    assert suggested, f"the message should say which group size to use: {message}"
    for group in suggested:
        assert head_dim % group == 0, f"suggested group {group} does not divide head_dim {head_dim}: {message}"
        parse_spec(f"{spec.split('-')[0]}-g{group}")  # and it is a group size kvpack accepts


@pytest.mark.parametrize(("spec", "head_dim"), [("k4v4-plain-g32-r16", 40), ("k4v4-plain-g16-r16", 8)])
def test_head_dim_no_group_divides_suggests_per_channel_values(spec: str, head_dim: int) -> None:
    layer = PackedLayer(parse_spec(spec))
    keys, values = make_stream(4, head_dim=head_dim)
    with pytest.raises(ShapeError, match="-vc") as info:
        layer.update(keys, values)
    assert not SUGGESTION.findall(str(info.value)), "no -g<group> fits, so none may be suggested"
    assert not layer.is_initialized


@pytest.mark.parametrize(
    ("make_keys", "make_values"),
    [
        pytest.param(lambda k: k[:1], lambda v: v[:1], id="batch"),
        pytest.param(lambda k: k[:, :2], lambda v: v[:, :2], id="heads"),
        pytest.param(lambda k: k[..., :16], lambda v: v, id="key_head_dim"),
        pytest.param(lambda k: k, lambda v: v[..., :16], id="value_head_dim"),
        pytest.param(lambda k: k, lambda v: torch.cat([v, v], dim=2), id="token_counts"),
        pytest.param(lambda k: k[0], lambda v: v[0], id="not_4d"),
    ],
)
def test_shape_change_after_init_raises_and_changes_nothing(make_keys, make_values) -> None:
    layer, keys, values = _populated_layer()
    before = layer_state(layer, raw=True)
    with pytest.raises(ShapeError) as info:
        layer.update(make_keys(keys[:, :, 60:63]), make_values(values[:, :, 60:63]))
    assert "layer 0" in str(info.value)
    assert_same_state(layer_state(layer, raw=True), before)


@pytest.mark.parametrize(
    ("make_keys", "make_values"),
    [
        pytest.param(lambda k: k[..., :2, :], lambda v: v, id="token_counts"),
        pytest.param(lambda k: k[0], lambda v: v[0], id="not_4d"),
        pytest.param(lambda k: k[:1], lambda v: v, id="batch"),
    ],
)
def test_inconsistent_keys_and_values_at_init_raise(make_keys, make_values) -> None:
    layer = PackedLayer(parse_spec("k4v4-plain-g16-r16"))
    keys, values = make_stream(4)
    with pytest.raises(ShapeError):
        layer.update(make_keys(keys), make_values(values))
    assert not layer.is_initialized


def _poison(t: torch.Tensor, token: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[1, 2, token, 5] = value
    return t


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e6], ids=["nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("target", ["keys", "values"])
def test_non_finite_tokens_being_quantized_raise_and_leave_the_layer_unchanged(target: str, bad: float) -> None:
    config = parse_spec("k4v4-plain-g16-r16-s2")
    keys, values = make_stream(130, seed=33)
    layer = PackedLayer(config)
    list(feed(layer, keys[:, :, :60], values[:, :, :60], [40] + [1] * 20))
    assert layer.residual_len == 26  # 58 non-sink tokens: 32 packed, 26 exact

    def poisoned(start: int, stop: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = keys[:, :, start:stop], values[:, :, start:stop]
        if target == "keys":
            return _poison(k, at, bad), v
        return k, _poison(v, at, bad)

    before = layer_state(layer, raw=True)
    # A chunk whose poisoned token is packed right away (it is older than the newest 16 after the update).
    k, v = poisoned(60, 100, at=5)
    with pytest.raises(NonFiniteError) as info:
        layer.update(k, v)
    assert isinstance(info.value, KVPackError)
    assert "NaN/Inf" in str(info.value)
    assert_same_state(layer_state(layer, raw=True), before)

    # A poisoned token that would stay in the residual is accepted (only quantization refuses it)...
    accepting = PackedLayer(config)
    list(feed(accepting, keys[:, :, :60], values[:, :, :60], [40] + [1] * 20))
    k, v = poisoned(60, 61, at=0)
    accepting.update(k, v)
    assert accepting.get_seq_length() == 61
    # ...and refused, atomically, exactly when it has to leave the residual window.
    poisoned_index = 60 - config.sinks  # among the non-sink tokens
    for pos in range(61, 130):
        packed_after = (pos + 1 - config.sinks - config.residual) // 16 * 16
        if packed_after <= poisoned_index:
            accepting.update(keys[:, :, pos : pos + 1], values[:, :, pos : pos + 1])
            continue
        before = layer_state(accepting, raw=True)
        with pytest.raises(NonFiniteError):
            accepting.update(keys[:, :, pos : pos + 1], values[:, :, pos : pos + 1])
        assert_same_state(layer_state(accepting, raw=True), before)
        break
    else:
        pytest.fail("the poisoned token never had to be quantized")

    # The layer that refused the chunk goes on as if the chunk never came.
    fresh = PackedLayer(config)
    list(feed(fresh, keys[:, :, :60], values[:, :, :60], [40] + [1] * 20))
    a = layer.update(keys[:, :, 60:100], values[:, :, 60:100])
    b = fresh.update(keys[:, :, 60:100], values[:, :, 60:100])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_finite_in_sinks_is_kept_exactly() -> None:
    layer = PackedLayer(parse_spec("k4v4-plain-g16-r0-s2"))
    keys, values = make_stream(40, seed=34)
    keys = _poison(keys, 1, float("nan"))
    out_keys, _ = layer.update(keys, values)
    assert torch.equal(as_bits(out_keys[:, :, :2]), as_bits(keys[:, :, :2]))
    assert layer.packed_length == 32


def test_refused_first_update_leaves_a_new_layer_unchanged() -> None:
    layer = PackedLayer(parse_spec("k4v4-plain-g16-r16"))
    keys, values = make_stream(60, seed=35)
    with pytest.raises(NonFiniteError):
        layer.update(_poison(keys, 3, float("nan")), values)
    assert_same_state(
        layer_state(layer, raw=True), layer_state(PackedLayer(parse_spec("k4v4-plain-g16-r16")), raw=True)
    )
    other_keys, other_values = make_stream(60, batch=1, dtype=torch.float16, seed=36)
    layer.update(other_keys, other_values)  # a new layer accepts any batch size and dtype


def test_offload_is_refused_clearly() -> None:
    layer, _, _ = _populated_layer()
    for method in (layer.offload, layer.prefetch):
        with pytest.raises(UnsupportedOperationError, match="offload"):
            method()


def test_every_kvpack_error_class_is_a_kvpack_error() -> None:
    classes = [
        obj for _, obj in inspect.getmembers(kvpack.errors, inspect.isclass) if obj.__module__ == kvpack.errors.__name__
    ]
    assert len(classes) >= 7
    for cls in classes:
        assert issubclass(cls, KVPackError)
        assert cls is KVPackError or cls.__doc__, f"{cls.__name__} needs a docstring"
