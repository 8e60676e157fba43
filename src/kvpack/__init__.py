"""kvpack: quantized, packed key/value caches for transformer language models."""

from kvpack.attention.registry import use_kvpack_attention
from kvpack.cache import KVPackCache
from kvpack.config import CacheConfig, QuantSpec, parse_spec
from kvpack.errors import (
    BackendUnavailableError,
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

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CacheConfig",
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
    "use_kvpack_attention",
]
