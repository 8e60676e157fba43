"""What kvpack supports, as data: architecture x model dtype x device x attention backend, each cell tested,
untested or refused.

This module is the one source of the README's support matrix (`markdown_table`, checked equal to the README by
`tests/test_support.py`) and of the architecture test matrix (`tests/test_architectures.py` runs every cell marked
tested, and only those). A cell is:

    tested    a test in CI runs it: the 8-bit cache reproduces the full-precision greedy output on a fixed prompt
              and the 4-bit cache keeps the stated agreement (`tests/test_architectures.py`)
    untested  expected to work, but nothing here runs it (CI has no GPU)
    refused   kvpack raises a `KVPackError` that says why (`UnsupportedModelError` for the architecture,
              `BackendUnavailableError` for a CPU kernel asked to read CUDA tensors)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["tested", "untested", "refused"]

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
# `dense`: the cache dequantizes, the model's own attention (SDPA) reads it; the others read the packed cache
# through `use_kvpack_attention` (see kvpack.attention).
BACKENDS = ("dense", "torch", "cpu", "numba")
# The CPU kernels read CPU tensors only; asked for by name on CUDA they raise BackendUnavailableError (`auto`
# takes `torch` there).
CPU_ONLY_BACKENDS = ("cpu", "numba")


@dataclass(frozen=True)
class Architecture:
    """One model family: its README label, transformers' `model_type`, and how it is covered.

    tested_with: what the tests run (a tiny random-weight config built in the test, real weights where a package
        ships them). refused: why kvpack refuses the family (the `UnsupportedModelError` it raises), or None.
    """

    label: str
    model_type: str
    tested_with: str
    refused: str | None = None


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("Llama", "llama", "tiny random config; real weights: SmolLM2-135M (the default model, float32)"),
    Architecture("Qwen2", "qwen2", "tiny random config (q/k/v biases)"),
    Architecture("Qwen3", "qwen3", "tiny random config (q/k norms)"),
    Architecture(
        "Mistral", "mistral", "tiny random config (no sliding window, as Mistral 7B v0.2+; with one: dense path)"
    ),
    Architecture("Phi-3", "phi3", "tiny random config (fused qkv, partial rotary)"),
    Architecture("GPT-NeoX", "gpt_neox", "tiny random config (parallel residual, partial rotary)"),
    Architecture(
        "Gemma 3",
        "gemma3_text",
        "tiny random config (sliding + global layers; the sliding ones always dense); real weights: Gemma 3 270M "
        "(float32)",
    ),
)

_CONFIG_ONLY = "the family's default config (no weights needed to refuse)"
REFUSED: tuple[Architecture, ...] = (
    Architecture("DeepSeek-V2", "deepseek_v2", _CONFIG_ONLY, "multi-head latent attention: caches a latent"),
    Architecture("DeepSeek-V3", "deepseek_v3", _CONFIG_ONLY, "multi-head latent attention: caches a latent"),
    Architecture("Qwen3-Next", "qwen3_next", _CONFIG_ONLY, "linear-attention layers (hybrid)"),
    Architecture("Jamba", "jamba", _CONFIG_ONLY, "Mamba layers (hybrid)"),
    Architecture("Falcon-H1", "falcon_h1", _CONFIG_ONLY, "Mamba and attention in each layer (hybrid)"),
    Architecture("Mamba", "mamba", _CONFIG_ONLY, "no attention: a recurrent state"),
    Architecture("RWKV", "rwkv", _CONFIG_ONLY, "no attention heads: a recurrent state"),
)


def status(arch: Architecture, dtype: str, device: str, backend: str) -> Status:
    """The support status of one cell."""
    if dtype not in DTYPES or device not in DEVICES or backend not in BACKENDS:
        raise ValueError(f"unknown cell ({dtype}, {device}, {backend}); see kvpack.support's DTYPES/DEVICES/BACKENDS.")
    if arch.refused is not None:
        return "refused"
    if device == "cuda":
        return "refused" if backend in CPU_ONLY_BACKENDS else "untested"
    return "tested"


def cells(state: Status | None = None) -> list[tuple[Architecture, str, str, str]]:
    """Every (architecture, dtype, device, backend) cell, or only those with status `state`."""
    found = []
    for arch in ARCHITECTURES + REFUSED:
        for dtype in DTYPES:
            for device in DEVICES:
                for backend in BACKENDS:
                    if state is None or status(arch, dtype, device, backend) == state:
                        found.append((arch, dtype, device, backend))
    return found


_SHORT = {"tested": "✅ tested", "untested": "untested", "refused": "⛔ refused"}


def markdown_table() -> str:
    """The README's support matrix: a row per architecture and dtype, a column per device and backend."""
    columns = [(device, backend) for device in DEVICES for backend in BACKENDS]
    header = "| architecture | dtype | " + " | ".join(f"{d} {b}" for d, b in columns) + " |"
    lines = [header, "|" + "---|" * (2 + len(columns))]
    for arch in ARCHITECTURES:
        for dtype in DTYPES:
            marks = [_SHORT[status(arch, dtype, d, b)] for d, b in columns]
            lines.append(f"| {arch.label} | {dtype} | " + " | ".join(marks) + " |")
    for arch in REFUSED:
        lines.append(f"| {arch.label} | any | " + " | ".join([_SHORT["refused"]] * len(columns)) + " |")
    lines += ["", "| architecture | `model_type` | tested with | refused because |", "|---|---|---|---|"]
    for arch in ARCHITECTURES + REFUSED:
        lines.append(f"| {arch.label} | `{arch.model_type}` | {arch.tested_with} | {arch.refused or ''} |")
    return "\n".join(lines) + "\n"
