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
