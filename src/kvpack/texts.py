"""The texts measurements run on, and their tokens: WikiText-2 test (evaluation) and kvpack's calibration text."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from kvpack.errors import KVPackError

_DATA_FILE = Path("shared") / "data" / "wikitext2_test.txt"


def default_data_path() -> Path:
    """WikiText-2 test in ../shared/data, beside the project (looked for from the working directory first)."""
    candidates = [Path.cwd().parent / _DATA_FILE, Path(__file__).resolve().parents[2].parent / _DATA_FILE]
    return next((path for path in candidates if path.is_file()), candidates[0])


def calibration_data_path() -> Path:
    """kvpack's calibration text (the Python Language Reference, shipped in the package; see `kvpack/data/README.md`).

    What `kvpack calibrate` and the codebook fit measure on: never the evaluation text.
    """
    return Path(__file__).resolve().parent / "data" / "calibration.txt"


def load_tokens(path: str | Path, tokenizer: Any, n_tokens: int) -> tuple[torch.Tensor, str]:
    """The first `n_tokens` of the whole file's tokenization, `[1, n_tokens]`, and the file's SHA-256.

    Raises KVPackError when the file is missing or has fewer tokens."""
    path = Path(path)
    if not path.is_file():
        raise KVPackError(
            f"evaluation text {path} not found; pass --data PATH (the default is WikiText-2 test in ../shared/data)."
        )
    raw = path.read_bytes()
    ids = tokenizer(raw.decode("utf-8"), return_tensors="pt").input_ids
    if ids.shape[1] < n_tokens:
        raise KVPackError(f"{path} has only {ids.shape[1]} tokens, fewer than the {n_tokens} asked for.")
    return ids[:, :n_tokens], hashlib.sha256(raw).hexdigest()
