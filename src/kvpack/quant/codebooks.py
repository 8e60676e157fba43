"""Reconstruction levels of the codes: a group's code `c` stands for `level[c] * scale + zero`.

`uniform` is level[c] = c, the plain affine format. A fitted codebook holds, per bit width and per group layout
(axis "channel": keys' groups of tokens; axis "token": values' groups of channels), a sorted table of 2**bits levels
in units of the step, inside [0, 2**bits - 1], so scale and zero keep their meaning (the group's range is
[zero, zero + scale * qmax]). The levels are Lloyd-Max quantizers of the keys/values of the default model over the
calibration text, each group normalized as the quantizer sees it (float16 zero and scale of its min/max range,
after the Hadamard rotation that recommended configs use). Stored caches depend on these numbers: a new fit gets
a new name (`lloyd2`, ...), never new numbers under an old one.
"""

from __future__ import annotations

import torch

from kvpack.config import CODEBOOKS, FITTED_CODEBOOK, Codebook

__all__ = ["CODEBOOKS", "FITTED_CODEBOOK", "Codebook", "codebook_levels"]

# Made by: PYTHONPATH=src python scripts/fit_codebooks.py fit --windows 4 --window 1024 --group 64
# on 2026-11-23: Lloyd-Max on the keys/values of the default model (SmolLM2-135M, 30 layers) over the first 4096
# tokens of the calibration text (kvpack/data/calibration.txt), Hadamard-rotated, groups of 64; keys: axis "channel",
# values: axis "token". Calibration text SHA-256: 41d484b8b7c45c6dfac33f6243c776d0da4143fc70fb44586feacd5d84a05e98
_LEVELS: dict[tuple[str, str, int], tuple[float, ...]] = {
    ("lloyd1", "channel", 2): (0.489868, 1.191890, 1.807122, 2.509556),  # keys
    ("lloyd1", "channel", 3): (0.426138, 1.506366, 2.360641, 3.127506, 3.869638, 4.636164, 5.490986, 6.571577),  # keys
    ("lloyd1", "channel", 4): (
        0.251235,
        1.629484,
        2.755955,
        3.742643,
        4.643797,
        5.490353,
        6.304117,
        7.099080,
        7.888028,
        8.682337,
        9.495279,
        10.342665,
        11.244804,
        12.233209,
        13.361070,
        14.744577,
    ),  # keys
    ("lloyd1", "token", 2): (0.496227, 1.197260, 1.801616, 2.503168),  # values
    ("lloyd1", "token", 3): (0.422838, 1.525883, 2.378363, 3.134698, 3.864280, 4.620783, 5.474329, 6.578213),  # values
    ("lloyd1", "token", 4): (
        0.246843,
        1.664556,
        2.810540,
        3.801505,
        4.698914,
        5.534983,
        6.335000,
        7.113701,
        7.886031,
        8.665152,
        9.464837,
        10.301670,
        11.198348,
        12.190040,
        13.338370,
        14.752730,
    ),  # values
}

_on_device: dict[tuple[str, str, int, torch.device], torch.Tensor] = {}


def codebook_levels(codebook: str, bits: int, axis: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The float32 `[2**bits]` level table of `codebook` for groups along `axis`, or None for `uniform`.

    Raises KeyError for a codebook, width or axis without a table (`QuantSpec` refuses those first).
    """
    if codebook == "uniform":
        return None
    device = torch.device(device)
    key = (codebook, axis, bits, device)
    if key not in _on_device:
        _on_device[key] = torch.tensor(_LEVELS[codebook, axis, bits], dtype=torch.float32, device=device)
    return _on_device[key]
