"""Property tests (hypothesis): random sequences of cache operations on a `KVPackCache` and on a `DynamicCache`.

Each example draws a cache spec (some keeping outlier entries), a dtype and a sequence of operations (prefill and
decode updates of random sizes, crops of the newest tokens, beam reorders with repeated rows, batch selections, batch
repeats) and applies it to both caches, layer by layer, through the `Cache` methods transformers calls. A third
model, the plain list of tokens every layer logically holds (`Stream`), is checked equal to what the DynamicCache
holds, and the kvpack cache is checked against it, bit for bit, after every operation:
  - sequence length and mask sizes equal the DynamicCache's;
  - what each layer stores is the stream with its packed range quantize-dequantized by the reference
    (`PackedTensor`), the sinks and the newest tokens exact; packed tokens are whole blocks, tokens an update packs
    are older than its newest `residual` (a crop may later bring packed tokens closer: only assisted decoding's past
    recording un-packs them), and no more than `residual + block - 1` tokens wait in the window;
  - what `update` returns is the stored past followed by the new tokens, exactly, in the DynamicCache's shape;
  - a crop kvpack cannot carry out exactly (into packed tokens) raises `UnsupportedOperationError` and changes
    nothing; every other crop removes exactly the newest tokens.
Two layer plans: two full-attention layers (a Llama config), and a sliding-window layer of 8 tokens next to a full one
(a Gemma 3 config; crops are left out there, as DynamicCache cannot crop a filled sliding window without past
recording).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvpack import KVPackCache
from kvpack.cache.layer import PackedLayer
from kvpack.errors import UnsupportedOperationError
from kvpack.quant.tensor import PackedTensor
from tests.helpers.models import gemma_config, llama_config

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

HEADS, HEAD_DIM = 2, 16
SPECS = [
    "k8v8-g16-r16", "k4v2-g16-r16-s3", "k2v4-gk32-gv16-r16", "k4v4-g16-r0", "k3v3-g16-r32-s1-kt",
    # outlier entries (`-o`): the buffers grow, crop, drop and reorder them with the codes
    "k4v2-g16-r16-o1", "k2v3-g16-r16-s3-ok2", "k3v2-gk32-gv16-r16-ov4", "k2v2-g16-r0-o2-rot", "k3v3-g16-r32-kt-o1",
]  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

Op = tuple[str, Any]


def operations(crops: bool) -> st.SearchStrategy[list[Op]]:
    step = st.one_of(
        st.tuples(st.just("update"), st.integers(1, 20)),
        st.tuples(st.just("update"), st.just(1)),
        st.tuples(st.just("reorder"), st.lists(st.integers(0, 7), min_size=8, max_size=8)),
        st.tuples(st.just("select"), st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True)),
        st.tuples(st.just("repeat"), st.integers(2, 3)),
        *([st.tuples(st.just("crop"), st.integers(1, 40))] if crops else []),
    )
    first = st.tuples(st.just("update"), st.integers(1, 70))
    return st.tuples(first, st.lists(step, min_size=1, max_size=12)).map(lambda t: [t[0], *t[1]])


@dataclass
class Stream:
    """The tokens one layer logically holds, oldest first: `[batch, heads, tokens, head_dim]` keys and values."""

    keys: torch.Tensor
    values: torch.Tensor


def expected_stored(layer: PackedLayer, stream: Stream) -> tuple[torch.Tensor, torch.Tensor]:
    """What `layer` must store given the stream: its held range (sliding layers drop whole old blocks), with the
    packed tokens (after the sinks) quantize-dequantized by the reference and every other token exact."""
    seen = stream.keys.shape[2]
    start = seen - layer.stored_tokens()
    a, b = start + layer.sink_len, start + layer.sink_len + layer.packed_length
    out = []
    for tensor, spec in ((stream.keys, layer.config.key), (stream.values, layer.config.value)):
        parts = [tensor[:, :, start:a]]
        if b > a:
            parts.append(PackedTensor.quantize(tensor[:, :, a:b], spec).dequantize(tensor.dtype))
        parts.append(tensor[:, :, b:])
        out.append(torch.cat(parts, dim=2))
    return out[0], out[1]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), f"{what} differs"


def check_layers(cache: KVPackCache, dynamic: DynamicCache, streams: list[Stream], packed_before: list[int]) -> None:
    for idx, (layer, ref, stream) in enumerate(zip(cache.layers, dynamic.layers, streams, strict=True)):
        assert isinstance(layer, PackedLayer)
        seen = stream.keys.shape[2]
        # The stream is what the DynamicCache holds (a sliding layer keeps its last window - 1 tokens).
        kept = seen if not ref.is_sliding else min(seen, ref.sliding_window - 1)
        if ref.is_initialized:
            assert torch.equal(ref.keys, stream.keys[:, :, seen - kept :]), f"layer {idx}: the model of DynamicCache"
        assert layer.get_seq_length() == ref.get_seq_length() == seen
        assert layer.get_mask_sizes(1) == ref.get_mask_sizes(1)
        if not layer.is_initialized:
            continue
        keys, values = layer.dense()
        want_keys, want_values = expected_stored(layer, stream)
        assert_bits_equal(keys, want_keys, f"layer {idx} keys")
        assert_bits_equal(values, want_values, f"layer {idx} values")
        block, residual = layer.config.block_tokens, layer.config.residual
        assert layer.packed_length % block == 0
        assert layer.residual_len < residual + block
        if layer.packed_length > packed_before[idx]:  # what an update packs is older than its newest `residual` tokens
            assert layer.stored_tokens() - layer.sink_len - layer.packed_length >= residual


def run_sequence(config: Any, spec: str, dtype: torch.dtype, ops: list[Op], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache, dynamic = KVPackCache(config, spec), DynamicCache(config=config)
    n_layers = len(cache.layers)
    batch = 2
    streams = [Stream(torch.empty(batch, HEADS, 0, HEAD_DIM, dtype=dtype), torch.empty(0)) for _ in range(n_layers)]
    for stream in streams:
        stream.values = stream.keys.clone()
    for name, arg in ops:
        packed_before = [layer.packed_length for layer in cache.layers]
        if name == "update":
            for idx, stream in enumerate(streams):
                keys = (torch.randn(batch, HEADS, arg, HEAD_DIM, generator=gen) * 3).to(dtype)
                keys[..., 5] += 10  # an outlier channel, as real keys have
                values = torch.randn(batch, HEADS, arg, HEAD_DIM, generator=gen).to(dtype)
                layer = cache.layers[idx]
                past = expected_stored(layer, stream) if layer.is_initialized else (stream.keys, stream.values)
                got = cache.update(keys, values, idx)
                ref = dynamic.update(keys, values, idx)
                for i, what in enumerate(("keys", "values")):
                    want = torch.cat([past[i], (keys, values)[i]], dim=2)[:, :, -ref[i].shape[2] :]
                    assert_bits_equal(got[i], want, f"layer {idx} update returned {what}")
                stream.keys = torch.cat([stream.keys, keys], dim=2)
                stream.values = torch.cat([stream.values, values], dim=2)
        elif name == "crop":
            before = [(layer.dense(), layer.get_seq_length()) for layer in cache.layers if layer.is_initialized]
            try:
                cache.crop(-arg)
            except UnsupportedOperationError:
                after = [(layer.dense(), layer.get_seq_length()) for layer in cache.layers if layer.is_initialized]
                for (b_kv, b_len), (a_kv, a_len) in zip(before, after, strict=True):
                    assert b_len == a_len and torch.equal(b_kv[0], a_kv[0]) and torch.equal(b_kv[1], a_kv[1])
                continue
            dynamic.crop(-arg)
            for stream in streams:
                keep = max(stream.keys.shape[2] - arg, 0)
                stream.keys, stream.values = stream.keys[:, :, :keep], stream.values[:, :, :keep]
        else:
            if streams[0].keys.shape[2] == 0:
                continue  # DynamicLayer skips batch operations while empty (after a crop of everything): no model
            if name == "reorder":
                index = torch.tensor([i % batch for i in arg[:batch]])
                cache.reorder_cache(index)
                dynamic.reorder_cache(index)
            elif name == "select":
                index = torch.tensor(sorted({i % batch for i in arg}))
                cache.batch_select_indices(index)
                dynamic.batch_select_indices(index)
            else:
                if batch * arg > 6:
                    continue
                index = torch.arange(batch).repeat_interleave(arg)
                cache.batch_repeat_interleave(arg)
                dynamic.batch_repeat_interleave(arg)
            for stream in streams:
                stream.keys, stream.values = stream.keys[index], stream.values[index]
            batch = len(index)
        check_layers(cache, dynamic, streams, packed_before)


SETTINGS = settings(max_examples=100, deadline=None, database=None)


@SETTINGS
@given(
    spec=st.sampled_from(SPECS),
    dtype=st.sampled_from(DTYPES),
    ops=operations(crops=True),
    seed=st.integers(0, 2**31 - 1),
)
# Found by hypothesis: a crop after packing leaves a packed token among the newest `residual` ones.
@example(spec="k3v3-g16-r32-s1-kt", dtype=torch.float32, ops=[("update", 34), ("crop", 2), ("update", 1)], seed=0)
def test_full_attention_layers_follow_dynamic_cache(spec: str, dtype: torch.dtype, ops: list[Op], seed: int) -> None:
    run_sequence(llama_config(), spec, dtype, ops, seed)


@SETTINGS
@given(
    spec=st.sampled_from(SPECS),
    dtype=st.sampled_from(DTYPES),
    ops=operations(crops=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_sliding_and_full_layers_follow_dynamic_cache(spec: str, dtype: torch.dtype, ops: list[Op], seed: int) -> None:
    run_sequence(gemma_config(), spec, dtype, ops, seed)
