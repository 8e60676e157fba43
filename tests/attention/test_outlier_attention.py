"""Attention over packed data with outliers (`-o<k>`): the torch backend computes the definition (outliers included);
the fused kernels that do not read outliers (cpu, numba, triton) refuse them with a reason, and `auto` says so."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from kvpack import KVPackCache
from kvpack.attention import cpu, registry, triton_gpu
from kvpack.attention.reference import AttentionInputs, attention_bias, reference_attention
from kvpack.attention.registry import attend, resolve_backend
from kvpack.config import QuantSpec
from kvpack.errors import BackendUnavailableError
from kvpack.quant.tensor import PackedTensor
from tests.attention.inputs import check, naive, padding_mask
from tests.attention.test_fused_cache import FUSED_LOGIT_TOL, step_logits
from tests.cache.test_cache import llama_config, prompt

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def outlier_inputs(
    bits: int, outliers: int, group: int, blocks: int, exact: int, sinks: int, rotation: str = "none",
    backend: str = "torch", batch: int = 2, kv_heads: int = 2,
) -> AttentionInputs:  # fmt: skip
    """KIVI-layout packed keys and values with `outliers` per group, of data with rare large spikes."""
    gen = torch.Generator().manual_seed(bits * 100 + outliers)

    def rand(tokens: int) -> torch.Tensor:
        x = torch.randn(batch, kv_heads, tokens, 64, generator=gen)
        spikes = torch.rand(x.shape, generator=gen) < 0.02
        return torch.where(spikes, 12 * torch.randn(x.shape, generator=gen), x)

    packed = blocks * group
    key = QuantSpec(bits, group, "channel", rotation, outliers=outliers)  # type: ignore[arg-type]
    value = QuantSpec(bits, group, "token", rotation, outliers=outliers)  # type: ignore[arg-type]
    return AttentionInputs(
        exact_keys=rand(sinks + exact), exact_values=rand(sinks + exact),
        packed_keys=PackedTensor.quantize(rand(packed), key), packed_values=PackedTensor.quantize(rand(packed), value),
        sink_len=sinks, backend=backend,
    )  # fmt: skip


def without_outliers(packed: PackedTensor) -> PackedTensor:
    """The same codes, scales and zeros read as if no entry were kept apart."""
    return replace(packed, spec=replace(packed.spec, outliers=0), outlier_values=None, outlier_positions=None)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize(
    ("bits", "outliers", "group", "blocks", "exact", "sinks", "queries"),
    [(2, 1, 32, 3, 5, 0, 1), (3, 2, 16, 5, 2, 3, 2), (4, 4, 32, 2, 7, 1, 1), (2, 2, 64, 2, 1, 0, 3)],
)
def test_torch_backend_matches_the_definition_with_outliers(
    bits: int, outliers: int, group: int, blocks: int, exact: int, sinks: int, queries: int, rotation: str,
    masked: bool,
) -> None:  # fmt: skip
    inputs = outlier_inputs(bits, outliers, group, blocks, max(exact, queries), sinks, rotation)
    query = torch.randn(2, 6, queries, 64, generator=torch.Generator().manual_seed(5))
    tokens = inputs.total_tokens
    mask = padding_mask(2, queries, tokens, pad=sinks + group + 3) if masked else None
    bias = attention_bias(mask, 2, queries, tokens)
    expected = naive(query, inputs, bias, scaling=0.125)
    check(attend(query, inputs, mask, scaling=0.125), expected, inputs)
    # Chunk boundaries inside the packed tokens: the chunked reference slices the outliers with their groups.
    check(reference_attention(query, inputs, mask, scaling=0.125, chunk_tokens=group), expected, inputs)
    # The definition reads the kept entries: without them it is another result, far beyond the tolerance.
    assert inputs.packed_keys is not None and inputs.packed_values is not None
    stripped = replace(
        inputs, packed_keys=without_outliers(inputs.packed_keys), packed_values=without_outliers(inputs.packed_values)
    )
    with pytest.raises(AssertionError, match="max error"):
        check(attend(query, stripped, mask, scaling=0.125), expected, inputs)


def test_fused_kernels_refuse_outliers_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_gpu, "interpreting", lambda: True)  # reach the layout checks on CPU tensors
    both = outlier_inputs(4, 1, 32, 2, 3, 0, backend="auto")
    assert both.packed_keys is not None and both.packed_values is not None
    keys_only = replace(both, packed_values=without_outliers(both.packed_values))
    values_only = replace(both, packed_keys=without_outliers(both.packed_keys))
    for inputs in (both, keys_only, values_only):
        assert "does not read outlier entries" in (cpu.supports(inputs) or "")
        assert "does not read outlier entries" in (triton_gpu.supports(inputs) or "")
        if importlib.util.find_spec("numba") is not None:
            from kvpack.attention import numba_cpu

            assert "does not read outlier entries" in (numba_cpu.supports(inputs) or "")
    plain = replace(keys_only, packed_keys=without_outliers(both.packed_keys))
    assert cpu.supports(plain) is None  # the refusal is about the outliers, nothing else


def test_auto_falls_back_to_torch_and_says_why(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(registry, "_fallbacks_said", set())
    inputs = outlier_inputs(2, 1, 32, 2, 3, 0, backend="auto")
    assert resolve_backend(inputs) == "torch"
    said = capsys.readouterr().err
    if cpu.why_unavailable() is None:
        assert "attention backend 'cpu' skipped: the CPU kernel does not read outlier entries" in said
    if importlib.util.find_spec("numba") is not None:
        assert "attention backend 'numba' skipped: the numba kernel does not read outlier entries" in said
    for backend in ("cpu", "numba"):
        with pytest.raises(BackendUnavailableError, match=f"'{backend}' cannot run here"):
            resolve_backend(replace(inputs, backend=backend))


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    ("spec", "plain"),
    [
        ("k2v2-g16-r16-o1", "k2v2-g16-r16"),
        ("k3v4-g16-r0-s2-ok2-ov1", "k3v4-g16-r0-s2"),
        ("k2v3-g16-r16-rot-o2", "k2v3-g16-r16-rot"),
    ],
)
def test_fused_steps_with_outliers_match_the_dense_path(
    llama: PreTrainedModel, spec: str, plain: str, backend: str
) -> None:
    ids = prompt(batch=2, tokens=90, seed=3)
    dense = step_logits(llama, KVPackCache(llama, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(llama, spec, backend=backend)
    fused = step_logits(llama, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    assert all(layer.packed_length > 0 for layer in cache.layers if hasattr(layer, "packed_length"))
    without = step_logits(llama, KVPackCache(llama, plain), ids, prefill=37, fused=False)
    assert (without - dense).abs().max().item() > FUSED_LOGIT_TOL  # the outliers changed what attention read
