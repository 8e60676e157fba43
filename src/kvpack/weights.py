"""Quantized model weights, so that a quantized cache is measured beside the weights the ecosystem pairs it with.

`--weights int8|int4` on `generate`, `ppl` and `compare` replaces the model's linear layers (all but the output
head) with optimum-quanto's weight-only quantized layers: int8 per output channel, int4 in groups, scales in the
model's dtype. Activations stay in the model's dtype. The bytes reported are the model's tensors as held after
quantization, counted once each (tied tensors are shared).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from kvpack.errors import ConfigError, KVPackError

WEIGHT_CHOICES = ("fp", "int8", "int4")
# Left in the model's dtype: the output head (tied to the embeddings in many models, and the most sensitive layer).
EXCLUDED_MODULES = ("lm_head",)


def check_weights(weights: str) -> None:
    """Raise ConfigError for a format other than fp, int8 and int4, and KVPackError naming the package to install
    when an int format needs optimum-quanto and it is missing."""
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"weights {weights!r}: use one of {', '.join(WEIGHT_CHOICES)}.")
    if weights != "fp" and (
        importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None
    ):
        raise KVPackError(
            "quantized weights need optimum-quanto: pip install 'kvpack[weights]' (or pip install optimum-quanto)."
        )


def quantize_weights(model: Any, weights: str) -> Any:
    """Quantize `model`'s linear weights in place to `weights` (`fp` leaves it as it is); returns the model. Raises
    as `check_weights` does.

    Run the quantized model under `torch.no_grad()`, not `torch.inference_mode()`: quanto's int4 matmul
    fails on inference tensors.
    """
    check_weights(weights)
    if weights == "fp":
        return model
    from optimum.quanto import freeze, qint4, qint8, quantize

    quantize(model, weights={"int8": qint8, "int4": qint4}[weights], exclude=list(EXCLUDED_MODULES))
    freeze(model)
    return model


def weight_nbytes(model: Any) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, quantized or not), each counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
