"""kvpack: quantized, packed key/value caches for transformer language models."""

from kvpack.cache import KVPackCache
from kvpack.config import CacheConfig, QuantSpec, parse_spec
from kvpack.errors import (
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
]
