"""`auto-<budget>` specs: a cache config chosen for the model at hand, calibrated once and kept on disk.

`KVPackCache(model, "auto-4.5")` (and `--cache auto-4.5` wherever the CLI takes a spec) runs
`kvpack.calibrate.calibrate_auto` on kvpack's calibration text the first time it sees a model, which chooses the
options (rotation of keys and/or values, clipped keys) and the per-layer bits within the budget, and writes the
profile to the profile store; later calls read it. The store is `$KVPACK_PROFILE_DIR`, else
`$XDG_CACHE_HOME/kvpack/profiles`, else `~/.cache/kvpack/profiles`. A stored profile is keyed by the model's
fingerprint (its config and sampled weights, as prompt-cache files check them, and its dtype), the budget and
`AUTO_VERSION` (raised whenever the choice procedure changes, so that an old choice is not reused).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpack.cache.persist import config_sha256, weights_sha256
from kvpack.calibrate import calibrate_auto
from kvpack.errors import ConfigError
from kvpack.profile import Profile, load_profile

AUTO_VERSION = 2
_AUTO = re.compile(r"^auto-(\d+(?:\.\d+)?)$")


def auto_budget(spec: object) -> float | None:
    """The budget of an `auto-<bits>` spec (`auto-4.5` -> 4.5); None for anything else."""
    if not isinstance(spec, str):
        return None
    match = _AUTO.match(spec.strip().lower())
    return float(match.group(1)) if match else None


def profile_dir() -> Path:
    """Where `auto-<budget>` profiles are kept (see the module doc)."""
    if explicit := os.environ.get("KVPACK_PROFILE_DIR"):
        return Path(explicit)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "kvpack" / "profiles"


def model_key(model: Any) -> str:
    """16 hex digits that change when the model's config, sampled weights or dtype change."""
    text = f"{config_sha256(model.config)}|{weights_sha256(model)}|{model.dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def auto_profile_path(model: Any, budget_bits: float) -> Path:
    """The store path of `model`'s `auto-<budget_bits>` profile."""
    return profile_dir() / f"{type(model).__name__}-{model_key(model)}-auto-{budget_bits:g}-v{AUTO_VERSION}.json"


# (the names `auto_profile_path` writes)
_STORED = re.compile(r"^(?P<model>.+)-[0-9a-f]{16}-auto-(?P<budget>[0-9.]+)-v(?P<version>\d+)\.json$")


@dataclass(frozen=True)
class StoredProfile:
    """One file of the profile store: its path, what its name says (model class, budget, `AUTO_VERSION` it
    was chosen by) and the profile read from it (None, with `error`, when it cannot be read)."""

    path: Path
    model_class: str
    budget_bits: float
    version: int
    profile: Profile | None
    error: str = ""

    @property
    def current(self) -> bool:
        """Whether `auto-<budget>` would still use it (chosen by today's procedure, readable)."""
        return self.version == AUTO_VERSION and self.profile is not None


def stored_profiles() -> list[StoredProfile]:
    """The `auto-<budget>` profiles in the store (`profile_dir()`), by name; files of other names are not listed."""
    folder = profile_dir()
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        match = _STORED.match(path.name)
        if match is None:
            continue
        profile, error = None, ""
        try:
            profile = load_profile(path)
        except (ConfigError, OSError) as exc:
            error = str(exc)
        found.append(
            StoredProfile(path, match["model"], float(match["budget"]), int(match["version"]), profile, error)
        )  # fmt: skip
    return found


def auto_profile(model: Any, budget_bits: float, tokenizer: Any = None, progress: bool = True) -> Profile:
    """`model`'s `auto-<budget_bits>` profile: read from the store, or calibrated now (`calibrate_auto`, about a
    minute on the default model at 2 threads) and stored. tokenizer: the model's (default: loaded from the model's
    own folder, `model.name_or_path`, without a download)."""
    if not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise ConfigError(
            f"auto-{budget_bits:g} calibrates on the model itself: pass the model, not its config "
            "(or a profile made by `kvpack calibrate`)."
        )
    path = auto_profile_path(model, budget_bits)
    if path.is_file():
        profile = load_profile(path)
        profile.check_model(model)
        return profile
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model, budget_bits)
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    if progress:
        print(f"auto-{budget_bits:g}: calibrating {name} once on kvpack's calibration text (kept in {path})")
    profile = calibrate_auto(model, tokenizer, budget_bits, model_name=name, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    profile.save(partial)
    partial.replace(path)  # never a partial profile under the final name, even with two processes calibrating
    profile.path = path
    return profile


def _tokenizer_of(model: Any, budget_bits: float) -> Any:
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    # A folder of GGUF files (the embedded default model) holds its tokenizer inside the model file.
    ggufs = sorted(Path(source).glob("*.gguf")) if source and Path(source).is_dir() else []
    attempts: list[dict[str, Any]] = [{"local_files_only": True}, *({"gguf_file": gguf.name} for gguf in ggufs)]
    for kwargs in attempts:
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            error = exc
    raise ConfigError(
        f"auto-{budget_bits:g} calibrates on text and needs the model's tokenizer, which kvpack could not load "
        f"from {source!r} ({type(error).__name__}): pass tokenizer=... (KVPackCache(model, spec, tokenizer=...))."
    ) from error
