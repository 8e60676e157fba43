"""The CPU kernel's integer products (AVX-512 VNNI): 2- and 4-bit uniform codes multiplied as integers, with the query
and the attention weights rounded to two 8-bit digits per packed block and row
(`kvpack.attention.cpu.integer_products`).

Every case of the backend grid that the integer path reads is checked against the float64 definition within the
bound that rounding adds (`tolerances.integer_products_bound`, derived there); codes it does not read (3 and 8 bits,
codebooks) give exactly the floating-point kernel's result. Other tests run with the integer products off (see
tests/conftest.py), so that they compare float arithmetic at float tolerances.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kvpack import KVPackCache
from kvpack.attention import cpu, op
from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import attention_bias
from kvpack.quant.packing import unpack
from kvpack.quant.rotation import rotation_matrix
from kvpack.quant.tensor import PackedTensor
from tests.helpers.backends import why_unavailable
from tests.helpers.cases import CODEBOOKS, ROTATED, UNIFORM
from tests.helpers.generation import step_logits
from tests.helpers.inputs import Case
from tests.helpers.models import prompt, tiny_llama
from tests.quant.tolerances import (
    INTEGER_LOGIT_SHARE,
    INTEGER_LOW_DIGITS,
    INTEGER_QUERY_SLACK,
    integer_products_bound,
)

pytestmark = [pytest.mark.usefixtures("one_intra_op_thread"), pytest.mark.integer_products]


@pytest.fixture(scope="module")
def kernel() -> Any:
    why = why_unavailable("cpu")
    if why:
        pytest.skip(why)
    built = cpu.extension()
    if not built.integer_products():
        pytest.skip("this CPU's build has no integer products (needs AVX-512 VNNI and VBMI)")
    return built


def reads_integers(bits: int, spec_codebook: str, row_bytes: int) -> bool:
    """Whether the kernel multiplies these codes as integers (2 or 4 bits, uniform, rows of whole 16-byte pieces)."""
    return bits in (2, 4) and spec_codebook == "uniform" and row_bytes % 16 == 0


INTEGER_CASES = [
    text
    for text in UNIFORM + ROTATED + CODEBOOKS
    if (case := Case.parse(text)).config.key.codebook == "uniform"
    and case.blocks > 0
    and (
        reads_integers(case.config.key.bits, "uniform", case.config.key.group_size * case.config.key.bits // 8)
        or reads_integers(case.config.value.bits, case.config.value.codebook, case.dim * case.config.value.bits // 8)
    )
]
FLOAT_ONLY_CASES = [
    "k8v8-plain-g64 b2 h1x2 p2 e3",
    "k3v3-plain-g32-s4 h2x4 p2 e7",
    "k4v4-plain-gk32-gv64-s1-cb b2 h2x3 p3 e5 pad7",
    "k4v4-plain-g16 h2x2 p3 e5",  # key rows of 8 bytes; value groups of 16 channels, split by the planar order
]


def codes_of(packed: PackedTensor) -> torch.Tensor:
    """The packed tensor's codes as stored (`packing.unpack`), float64: `[B, H, NB, D, G]` for keys per channel,
    `[B, H, tokens, Dv]` for values per token."""
    return unpack(packed.codes, packed.spec.bits, packed.codes.shape[-1] * 8 // packed.spec.bits).double()


def integer_attention(
    case: Case, query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None
) -> tuple[torch.Tensor, float]:
    """What the integer products compute, in float64 (`[B, Q, Hq, Dv]`), and the bound of the kernel's distance to it
    (`tolerances.integer_products_bound`): the query rounded per block and row as the kernel rounds it, the weights
    exact (their rounding is in the bound)."""
    pk, pv = inputs.packed_keys, inputs.packed_values
    assert pk is not None and pv is not None
    batch, heads, queries, dim = query.shape
    kv_heads, group = pk.shape[1], pk.spec.group_size
    blocks = pk.shape[2] // group
    key_codes = codes_of(pk)  # [B, H, NB, D, G]
    key_middle = ((1 << pk.spec.bits) - 1) / 2
    # The kernel's query rows per kv head, rounded as it rounds them (float32 throughout).
    rows = query.float() * torch.tensor(case.scaling, dtype=torch.float32)
    if pk.spec.rotation != "none":
        rows = rows @ rotation_matrix(dim, query.device).float()
    rows = rows.reshape(batch, kv_heads, -1, dim)
    qs = rows[:, :, :, None, :] * pk.scale.float()[:, :, None]  # [B, H, R, NB, D]
    top = qs.abs().amax(-1, keepdim=True)
    steps = qs * torch.where(top > 0, 127 / top, torch.zeros_like(top))
    high = steps.round()
    low = ((steps - high) * INTEGER_LOW_DIGITS).round()
    alpha = (top / 127).double()
    left = qs.double() - alpha * (high.double() + low.double() / INTEGER_LOW_DIGITS)  # e = qs - what the digits say
    shift = torch.einsum("bhrnd,bhndg->bhrng", left, key_codes - key_middle)  # what the rounding takes off a score
    rotated = pk.spec.rotation != "none"
    per_channel = alpha * (1 / INTEGER_LOW_DIGITS + INTEGER_QUERY_SLACK) if rotated else torch.zeros_like(alpha)
    tie_shift = torch.einsum("bhrnd,bhndg->bhrng", per_channel.expand_as(left), (key_codes - key_middle).abs())
    if not reads_integers(pk.spec.bits, pk.spec.codebook, group * pk.spec.bits // 8):
        shift, tie_shift = torch.zeros_like(shift), torch.zeros_like(tie_shift)
    keys_all, values_all = inputs.dense(torch.float64)
    tokens, rep = keys_all.shape[2], heads // kv_heads
    scores = query.double() @ keys_all.repeat_interleave(rep, 1).transpose(-1, -2) * case.scaling
    sinks, packed = inputs.sink_len, blocks * group
    scores[..., sinks : sinks + packed] -= shift.reshape(batch, heads, queries, packed)
    bias = attention_bias(mask, batch, queries, tokens)
    if bias is not None:
        scores = scores + bias[:, None].double()
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = (weights @ values_all.repeat_interleave(rep, 1)).transpose(1, 2)
    value_codes = codes_of(pv)
    value_scales = pv.scale.double().repeat_interleave(pv.spec.group_size, dim=-1)  # each value's group scale
    allowed = integer_products_bound(
        tie_shift.amax(dim=(-1, -2)),
        weights[..., sinks : sinks + packed].reshape(batch, kv_heads, -1, blocks, group),
        value_codes.reshape(batch, kv_heads, blocks, group, -1),
        value_scales.reshape(batch, kv_heads, blocks, group, -1),
        ((1 << pv.spec.bits) - 1) / 2,
        values_all.abs().max().item(),
    )
    return expected, allowed


def run(
    query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float, integer: bool
) -> torch.Tensor:
    bias = attention_bias(mask, query.shape[0], query.shape[2], inputs.total_tokens)
    args = op.arguments(query.float(), inputs, bias, scaling, None, integer)
    return torch.ops.kvpack.packed_attention(*args)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("text", INTEGER_CASES)
def test_integer_products_stay_within_their_bound_of_their_float64_definition(
    kernel: Any, text: str, masked: bool
) -> None:
    case = Case.parse(text)
    inputs, query = case.inputs(), case.query()
    mask = case.mask(inputs.total_tokens) if masked else None
    expected, allowed = integer_attention(case, query, inputs, mask)
    out = run(query, inputs, mask, case.scaling, integer=True)
    error = (out.double() - expected).abs().max().item()
    assert error <= allowed, f"max error {error:.3g} > bound {allowed:.3g}"


@pytest.mark.parametrize("text", ["k4v4-plain-g64 h3x3 p3 e5", "k2v2-plain-g64-s1 b2 h2x2 p4 e1 q2"])
def test_integer_products_run_where_the_codes_allow(kernel: Any, text: str) -> None:
    """The integer path is taken: another result than the float path's, which is deterministic (run twice, the same
    bits), while codes it does not read give the float path's bits (below)."""
    case = Case.parse(text)
    inputs, query = case.inputs(), case.query()
    floating = run(query, inputs, None, case.scaling, integer=False)
    assert torch.equal(floating, run(query, inputs, None, case.scaling, integer=False))
    assert not torch.equal(run(query, inputs, None, case.scaling, integer=True), floating)


@pytest.mark.parametrize("text", FLOAT_ONLY_CASES)
def test_codes_the_integer_path_does_not_read_give_the_float_result(kernel: Any, text: str) -> None:
    case = Case.parse(text)
    inputs, query = case.inputs(), case.query()
    integer = run(query, inputs, None, case.scaling, integer=True)
    assert torch.equal(integer, run(query, inputs, None, case.scaling, integer=False))


@pytest.mark.parametrize("spec", ["k4v4-g32-r16", "k4v4-g32-r16-s2-rot"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_integer_products_add_a_thousandth_of_the_codes_error_to_a_models_logits(
    kernel: Any, spec: str, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ids = tiny_llama(head_dim=head_dim), prompt(batch=2, tokens=100, seed=3)
    full = step_logits(model, DynamicCache(), ids, prefill=37, fused=False)
    dense = step_logits(model, KVPackCache(model, spec), ids, prefill=37, fused=False)
    integer = step_logits(model, KVPackCache(model, spec, backend="cpu"), ids, prefill=37, fused=True)
    monkeypatch.setattr(cpu, "integer_products", False)
    floating = step_logits(model, KVPackCache(model, spec, backend="cpu"), ids, prefill=37, fused=True)
    assert not torch.equal(integer, floating)  # the integer products ran
    codes_error = (dense - full).abs().max().item()
    assert (integer - dense).abs().max().item() <= INTEGER_LOGIT_SHARE * codes_error
