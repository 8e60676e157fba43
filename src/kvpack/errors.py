"""The exceptions kvpack raises. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class KVPackError(Exception):
    """Base class of every error kvpack raises on purpose."""


class ConfigError(KVPackError, ValueError):
    """A cache configuration or spec string is invalid (bad bit width, group size, residual...)."""


class ShapeError(KVPackError, ValueError):
    """Keys/values have a shape the configuration cannot handle (e.g. head_dim not divisible by the group)."""


class DtypeDeviceError(KVPackError, TypeError):
    """Keys/values arrive with a dtype or device other than the cache was initialised with or supports."""


class NonFiniteError(KVPackError, ValueError):
    """A key or value about to be quantized is NaN/Inf or outside the float16 range of scales and zeros."""


class UnsupportedOperationError(KVPackError, NotImplementedError):
    """A cache operation that kvpack cannot carry out without losing correctness (it never guesses)."""


class UnsupportedModelError(KVPackError, ValueError):
    """The model's attention cache is not plain per-head keys/values (latent attention, linear/hybrid layers...)."""


class ModelNotFoundError(KVPackError, FileNotFoundError):
    """The requested model (or the embedded default's package) is not available on this machine."""


class BackendUnavailableError(KVPackError, RuntimeError):
    """An explicitly requested attention backend cannot run here (package missing, device or layout unsupported)."""


class CacheFileError(KVPackError, ValueError):
    """A saved prompt cache cannot be used; nothing from it was used. `check` names the check that failed.

    Subclasses by kind: `CacheFormatError` (not a kvpack prompt cache, truncated, malformed), `CacheVersionError`
    (another schema version), `CacheChecksumError` (content changed after it was written), `CacheModelMismatchError`
    (built for another model or tokenizer).
    """

    def __init__(self, message: str, check: str):
        super().__init__(message)
        self.check = check


class CacheFormatError(CacheFileError):
    """The file cannot be read as a kvpack prompt cache: missing, truncated, not one, or its header is malformed."""


class CacheVersionError(CacheFileError):
    """The file was written with a prompt-cache schema version this kvpack does not read."""


class CacheChecksumError(CacheFileError):
    """The file's content does not match the checksum written with it: it is corrupt or was modified."""


class CacheModelMismatchError(CacheFileError):
    """The file was built for another model (architecture, shapes, dtype, config or weights) or tokenizer."""
