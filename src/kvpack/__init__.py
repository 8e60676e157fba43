"""kvpack: quantized, packed key/value caches for transformer language models."""

from kvpack.attention.registry import use_kvpack_attention
from kvpack.cache import KVPackCache
from kvpack.cache.persist import prefix_cache
from kvpack.config import CacheConfig, QuantSpec, parse_spec
from kvpack.errors import (
    BackendUnavailableError,
    CacheChecksumError,
    CacheFileError,
    CacheFormatError,
    CacheModelMismatchError,
    CacheVersionError,
    ConfigError,
    DtypeDeviceError,
    KVPackError,
    ModelNotFoundError,
    NonFiniteError,
    ShapeError,
    UnsupportedModelError,
    UnsupportedOperationError,
)
from kvpack.quant import PackedTensor
from kvpack.version import __version__

__all__ = [
    "BackendUnavailableError",
    "CacheChecksumError",
    "CacheConfig",
    "CacheFileError",
    "CacheFormatError",
    "CacheModelMismatchError",
    "CacheVersionError",
    "ConfigError",
    "DtypeDeviceError",
    "KVPackCache",
    "KVPackError",
    "ModelNotFoundError",
    "NonFiniteError",
    "PackedTensor",
    "QuantSpec",
    "ShapeError",
    "UnsupportedModelError",
    "UnsupportedOperationError",
    "__version__",
    "parse_spec",
    "prefix_cache",
    "use_kvpack_attention",
]
