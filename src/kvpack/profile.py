"""Calibrated profiles: a per-layer allocation of bits (`kvpack calibrate` writes one) and the model it fits.

A profile is a versioned JSON file: the cache config it chose (per-layer bits), the model whose cache shape it was
measured on (`ProfileModel`), the calibration data and the measured sensitivities. `resolve_config` accepts its path
wherever a preset or spec string is accepted; `KVPackCache` checks that the model has the profile's shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from kvpack.cache.plan import cache_shape
from kvpack.config import CacheConfig, as_config
from kvpack.errors import ConfigError

PROFILE_FORMAT = "kvpack.profile"
PROFILE_SCHEMA_VERSION = 1


# -- the model a profile is for --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileModel:
    """What a profile's per-layer choice depends on: the model's name (a label) and its cache's shape."""

    name: str
    architecture: str
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model_or_config: Any, name: str) -> ProfileModel:
        """The fingerprint of a model (or its config)."""
        shape = cache_shape(model_or_config)
        return cls(name, shape.architecture, shape.layers, shape.kv_heads, shape.head_dim)

    def mismatch(self, other: ProfileModel) -> str | None:
        """None when `other` has the same cache shape, else what differs (the name is a label, not compared)."""
        for field_name in ("architecture", "layers", "kv_heads", "head_dim"):
            ours, theirs = getattr(self, field_name), getattr(other, field_name)
            if ours != theirs:
                return f"{field_name} {ours} (profile) vs {theirs} (model)"
        return None


# -- the profile -----------------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """A calibrated per-layer allocation and what it was measured on (the JSON file `kvpack calibrate` writes).

    config: the cache config (its `layer_bits` is the choice). model: the model it was calibrated for. data_name,
    data_sha256, tokens: the calibration text and how many of its tokens were used. budget_bits, average_bits: the
    budget and the achieved `config.average_bits` (bits per value, metadata included). candidates: the measured
    bit widths. key_kl, value_kl: `[layer][candidate]` mean KL when only that tensor is quantized at that width.
    method: how the KLs were measured (`kvpack.calibrate.METHODS`; profiles written before it was recorded were
    emulated). choices: for a profile that chose its options too (`kvpack.calibrate.calibrate_auto`), every config
    it measured whole on the calibration text: `base`, `kind` (`per layer` or `uniform`), `spec`, `average_bits`,
    `kl`; the lowest `kl` is the profile's config.
    """

    config: CacheConfig
    base: str
    model: ProfileModel
    data_name: str
    data_sha256: str
    tokens: int
    budget_bits: float
    average_bits: float
    candidates: tuple[int, ...]
    key_kl: list[list[float]]
    value_kl: list[list[float]]
    seconds: float = 0.0
    kvpack_version: str = ""
    created: str = ""
    method: str = "emulate"
    choices: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """A short name for tables: `profile:<file stem>` (the canonical spec holds two digits per layer)."""
        return f"profile:{self.path.stem}" if self.path is not None else f"profile:{self.config.spec}"

    @property
    def predicted_kl(self) -> float:
        """Sum of the measured KLs of the chosen bit widths (the additive model's prediction)."""
        return sum(
            self.key_kl[i][self.candidates.index(k)] + self.value_kl[i][self.candidates.index(v)]
            for i, (k, v) in enumerate(self.config.layer_bits)
        )

    def check_model(self, model_or_config: Any) -> None:
        """Raise ConfigError when the profile was made for a model whose cache has another shape."""
        ours = ProfileModel.of(model_or_config, self.model.name)
        problem = self.model.mismatch(ours)
        if problem is not None:
            where = f" ({self.path})" if self.path else ""
            raise ConfigError(
                f"the profile{where} was calibrated for {self.model.name} ({self.model.architecture}, "
                f"{self.model.layers} layers), not this model: {problem}. Run `kvpack calibrate` for this model."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see the module doc)."""
        return {
            "format": PROFILE_FORMAT,
            "schema_version": PROFILE_SCHEMA_VERSION,
            "kvpack_version": self.kvpack_version,
            "created": self.created,
            "model": {
                "name": self.model.name,
                "architecture": self.model.architecture,
                "layers": self.model.layers,
                "kv_heads": self.model.kv_heads,
                "head_dim": self.model.head_dim,
            },
            "data": {"name": self.data_name, "sha256": self.data_sha256, "tokens": self.tokens},
            "base": self.base,
            "method": self.method,
            "candidates": list(self.candidates),
            "budget_bits": self.budget_bits,
            "average_bits": self.average_bits,
            "predicted_kl": self.predicted_kl,
            "seconds": self.seconds,
            "spec": self.config.spec,
            "cache_config": self.config.to_dict(),
            "choices": self.choices,
            "layers": [
                {
                    "layer": i,
                    "key_bits": k,
                    "value_bits": v,
                    "key_kl": dict(zip(map(str, self.candidates), self.key_kl[i], strict=True)),
                    "value_kl": dict(zip(map(str, self.candidates), self.value_kl[i], strict=True)),
                }
                for i, (k, v) in enumerate(self.config.layer_bits)
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> Profile:
        """Inverse of `to_dict`; raises ConfigError naming what is missing or wrong."""
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ConfigError(f'{where} is not a kvpack profile (no "format": "{PROFILE_FORMAT}").')
        version = data.get("schema_version")
        if version != PROFILE_SCHEMA_VERSION:
            raise ConfigError(
                f"{where} has profile schema_version {version!r}; this kvpack reads version {PROFILE_SCHEMA_VERSION}: "
                "re-run `kvpack calibrate` with this version."
            )
        try:
            config = CacheConfig.from_dict(data["cache_config"])
            candidates = tuple(int(b) for b in data["candidates"])
            layers = data["layers"]
            key_kl = [[float(row["key_kl"][str(b)]) for b in candidates] for row in layers]
            value_kl = [[float(row["value_kl"][str(b)]) for b in candidates] for row in layers]
            chosen = tuple((int(row["key_bits"]), int(row["value_bits"])) for row in layers)
            model = ProfileModel(**data["model"])
            profile = cls(
                config=config,
                base=str(data["base"]),
                model=model,
                data_name=str(data["data"]["name"]),
                data_sha256=str(data["data"]["sha256"]),
                tokens=int(data["data"]["tokens"]),
                budget_bits=float(data["budget_bits"]),
                average_bits=float(data["average_bits"]),
                candidates=candidates,
                key_kl=key_kl,
                value_kl=value_kl,
                seconds=float(data.get("seconds", 0.0)),
                kvpack_version=str(data.get("kvpack_version", "")),
                created=str(data.get("created", "")),
                method=str(data.get("method", "emulate")),
                choices=[dict(choice) for choice in data.get("choices", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise ConfigError(f"{where}: {exc}") from exc
            raise ConfigError(f"{where} is malformed: {type(exc).__name__}: {exc}") from exc
        if config.layer_bits != chosen or len(chosen) != model.layers:
            raise ConfigError(
                f"{where} is inconsistent: its cache config has per-layer bits for {len(config.layer_bits)} layers "
                f"({config.spec}), its layer table {len(chosen)} rows, its model {model.layers} layers."
            )
        return profile

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as indented JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        self.path = path


def is_profile_path(config: object) -> TypeGuard[str | os.PathLike[str]]:
    """Whether `config` names a profile file (a path object, or a string ending in `.json`)."""
    return isinstance(config, os.PathLike) or (isinstance(config, str) and config.strip().lower().endswith(".json"))


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a profile written by `kvpack calibrate`; ConfigError when it is missing, not JSON, or not a profile."""
    path = Path(str(path).strip()) if isinstance(path, str) else Path(path)
    if not path.is_file():
        raise ConfigError(f"profile {path} does not exist; make one with `kvpack calibrate -o {path}`.")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"profile {path} is not valid JSON ({exc}); make it again with `kvpack calibrate`.") from exc
    profile = Profile.from_dict(data, where=f"profile {path}")
    profile.path = path
    return profile


def resolve_config(config: CacheConfig | str | os.PathLike[str], model: Any = None) -> CacheConfig:
    """`kvpack.config.as_config`, and also the path of a calibrated profile (a `.json` file written by `kvpack
    calibrate`): its cache config. A missing, invalid or other-version profile raises ConfigError, and so does a
    profile made for a model whose cache has another shape than `model` (a model or its config), when given."""
    if isinstance(config, str) and config.strip().lower().startswith("auto-"):
        raise ConfigError(
            f"{config.strip()} is chosen per model: `KVPackCache(model, {config.strip()!r})` calibrates the model (or "
            "reads its stored profile); this call has no model to calibrate."
        )
    if not is_profile_path(config):
        return as_config(config)
    profile = load_profile(config)
    if model is not None:
        profile.check_model(model)
    return profile.config
