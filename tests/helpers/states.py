"""What a cache holds: its packed layers, and a bit-for-bit comparison of two caches' states."""

from __future__ import annotations

import torch

from kvpack import KVPackCache
from kvpack.cache.layer import PackedLayer


def packed_layers(cache: KVPackCache) -> list[PackedLayer]:
    """The cache's layers that pack (sliding ones included: `PackedSlidingLayer` is a `PackedLayer`)."""
    return [layer for layer in cache.layers if isinstance(layer, PackedLayer)]


def assert_same_states(a: KVPackCache, b: KVPackCache) -> None:
    """Every layer holds the same counts and bit-identical tensors (dtype, shape, device type and bytes)."""
    assert len(a.layers) == len(b.layers) and type(a) is type(b)
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        assert type(layer_a) is type(layer_b)
        if not isinstance(layer_a, PackedLayer):
            continue
        assert isinstance(layer_b, PackedLayer)
        state_a, state_b = layer_a.state(), layer_b.state()
        assert (state_a.seen_tokens, state_a.record_past) == (state_b.seen_tokens, state_b.record_past)
        tensors_a, tensors_b = state_a.tensors(), state_b.tensors()
        assert tensors_a.keys() == tensors_b.keys()
        for name, x in tensors_a.items():
            y = tensors_b[name]
            assert x.dtype == y.dtype and x.shape == y.shape and x.device.type == y.device.type, name
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), name
        for part in ("packed_keys", "packed_values"):
            packed_a, packed_b = getattr(state_a, part), getattr(state_b, part)
            assert (packed_a is None) == (packed_b is None)
            if packed_a is not None:
                assert packed_a.shape == packed_b.shape and packed_a.spec == packed_b.spec
