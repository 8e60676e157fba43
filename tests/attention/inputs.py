"""Attention inputs built from real packed data, and the naive float64 definition every backend is checked against."""

from __future__ import annotations

import platform

import pytest
import torch

from kvpack.attention import cpu
from kvpack.attention.reference import AttentionInputs
from kvpack.config import QuantSpec
from kvpack.quant.tensor import PackedTensor
from tests.quant.tolerances import ATTENTION_REL_TOL


def make_inputs(
    batch: int, kv_heads: int, packed_blocks: int, exact: int, sinks: int, key_bits: int, value_bits: int,
    group: int, dim: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0, backend: str = "auto",
    value_group: int | None = None, key_rotation: str = "none", value_rotation: str = "none",
    key_codebook: str = "uniform", value_codebook: str = "uniform", clip: bool = False,
) -> AttentionInputs:  # fmt: skip
    """Random keys and values `[batch, kv_heads, tokens, dim]` (one outlier channel): `packed_blocks` blocks of
    `group` tokens quantized in the KIVI layout (values in groups of `value_group` channels, default `group`;
    each stored rotated, with a codebook and clipped as asked), then `exact` tokens after `sinks` exact sinks."""
    gen = torch.Generator().manual_seed(seed)
    packed = packed_blocks * group

    def rand(tokens: int) -> torch.Tensor:
        x = torch.randn(batch, kv_heads, tokens, dim, generator=gen)
        x[..., 3] *= 8  # an outlier channel, as keys have
        return x.to(dtype)

    packed_keys = packed_values = None
    if packed:
        key_spec = QuantSpec(key_bits, group, "channel", key_rotation, key_codebook, clip)  # type: ignore[arg-type]
        value_spec = QuantSpec(
            value_bits,
            value_group or group,
            "token",
            value_rotation,
            value_codebook,
            clip,  # type: ignore[arg-type]
        )
        packed_keys = PackedTensor.quantize(rand(packed), key_spec)
        packed_values = PackedTensor.quantize(rand(packed), value_spec)
    return AttentionInputs(
        exact_keys=rand(sinks + exact), exact_values=rand(sinks + exact), packed_keys=packed_keys,
        packed_values=packed_values, sink_len=sinks, backend=backend,
    )  # fmt: skip


def on(inputs: AttentionInputs, device: torch.device, backend: str = "triton") -> AttentionInputs:
    """`inputs` on `device` (the triton backend's tests: `triton_device`), to be read by `backend`."""

    def move(packed: PackedTensor | None) -> PackedTensor | None:
        return None if packed is None else packed.map_parts(lambda t: t.to(device))

    return AttentionInputs(
        inputs.exact_keys.to(device), inputs.exact_values.to(device), move(inputs.packed_keys),
        move(inputs.packed_values), inputs.sink_len, backend=backend,
    )  # fmt: skip


def naive(query: torch.Tensor, inputs: AttentionInputs, bias: torch.Tensor | None, scaling: float) -> torch.Tensor:
    keys, values = inputs.dense(torch.float64)
    rep = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = query.double() @ keys.transpose(-1, -2) * scaling
    if bias is not None:
        scores = scores + bias[:, None].double()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    return (weights @ values).transpose(1, 2)


def padding_mask(batch: int, queries: int, tokens: int, pad: int) -> torch.Tensor:
    """transformers' boolean mask [batch, 1, queries, tokens]: causal, and the first `pad` tokens of sample 0 masked."""
    past = tokens - queries
    mask = torch.arange(tokens)[None, :] <= past + torch.arange(queries)[:, None]
    mask = mask.expand(batch, 1, queries, tokens).clone()
    mask[0, :, :, :pad] = False
    return mask


def check(out: torch.Tensor, expected: torch.Tensor, inputs: AttentionInputs) -> None:
    scale = inputs.dense()[1].abs().max().item()
    error = (out.double() - expected).abs().max().item()
    assert error <= ATTENTION_REL_TOL * scale, f"max error {error:.3g} > {ATTENTION_REL_TOL} x {scale:.3g}"


needs_x86_compiler = pytest.mark.skipif(
    platform.machine() != "x86_64" or cpu.why_unavailable() is not None, reason="needs an x86-64 C++ compiler"
)


def use_portable_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the cpu backend use the kernel built without AVX-512 (for AVX2, ~40 s once), on one thread."""
    portable = cpu.extension("x86-64-v3")
    assert "AVX-512" not in portable.simd_path()
    monkeypatch.setattr(cpu, "extension", lambda: portable)
    torch.set_num_threads(1)
