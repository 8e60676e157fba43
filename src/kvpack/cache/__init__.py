"""The packed KV cache: per-layer storage and the transformers `Cache`."""

from kvpack.cache.cache import KVPackCache
from kvpack.cache.layer import PackedLayer, PackedSlidingLayer

__all__ = ["KVPackCache", "PackedLayer", "PackedSlidingLayer"]
