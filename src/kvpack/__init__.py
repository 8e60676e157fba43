"""kvpack: quantized, packed key/value caches for transformer language models."""

from typing import TYPE_CHECKING, Any

from kvpack.attention.registry import use_kvpack_attention
from kvpack.cache import KVPackCache
from kvpack.cache.persist import prefix_cache
from kvpack.chat import Conversation, Turn
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

if TYPE_CHECKING:
    from kvpack.pipeline import KVPackTextGenerationPipeline


def __getattr__(name: str) -> Any:
    # Imported on first use: the pipeline subclasses transformers' text-generation pipeline, whose import is slow.
    if name == "KVPackTextGenerationPipeline":
        from kvpack.pipeline import KVPackTextGenerationPipeline

        return KVPackTextGenerationPipeline
    raise AttributeError(f"module 'kvpack' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "CacheChecksumError",
    "CacheConfig",
    "CacheFileError",
    "CacheFormatError",
    "CacheModelMismatchError",
    "CacheVersionError",
    "ConfigError",
    "Conversation",
    "DtypeDeviceError",
    "KVPackCache",
    "KVPackError",
    "KVPackTextGenerationPipeline",
    "ModelNotFoundError",
    "NonFiniteError",
    "PackedTensor",
    "QuantSpec",
    "ShapeError",
    "Turn",
    "UnsupportedModelError",
    "UnsupportedOperationError",
    "__version__",
    "parse_spec",
    "prefix_cache",
    "use_kvpack_attention",
]
