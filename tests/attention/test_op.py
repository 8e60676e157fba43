"""The `kvpack::packed_attention` operator: one torch operator with a kernel per device (the C++ kernel on CPU,
Triton on CUDA, the float reference elsewhere, shapes only for tracing), resolved once per cache layer."""

from __future__ import annotations

import pytest
import torch

from kvpack.attention import op, registry
from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import attention_bias
from kvpack.cache import KVPackCache
from kvpack.compat import cache_kwargs
from kvpack.quant.tensor import PackedTensor
from tests.helpers.backends import backend_params, why_unavailable
from tests.helpers.inputs import Case, assert_close_to_definition, attention_definition
from tests.helpers.models import prompt, tiny_llama

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CASES = [
    Case.parse(text)
    for text in (
        "k4v4-plain-g64 h3x3 p3 e5",
        "k4v2-plain-g32-s2 h2x2 p4 e9 q3",
        "k2v8-plain-gk32-gv64-s1 h1x8 p2 e3 d128",
        "k4v4-plain-g32-s2-rot h2x2 p3 e4 q2",  # keys and values stored rotated
        "k3v4-plain-g32-cb h2x1 p2 e3",  # codebook levels
        "k2v2-plain-g32-cb-rot b2 h1x3 p2 e2",
        "k4v4-plain-g32 b2 h2x2 p0 e6",  # nothing packed yet
    )
]
IMPLEMENTATIONS = ["reference", *backend_params("cpu", "triton")]


def _call(query: torch.Tensor, inputs: AttentionInputs, masked: bool, case: Case) -> tuple[torch.Tensor, tuple]:
    """The operator's arguments for `case`, and the mask the definition applies (causal and padded, or none)."""
    queries = query.shape[2]
    mask = case.mask(inputs.total_tokens) if masked else None
    bias = attention_bias(mask, query.shape[0], queries, inputs.total_tokens) if masked else None
    return mask, op.arguments(query, inputs, bias, case.scaling)


def _run(implementation: str, args: tuple) -> torch.Tensor:
    if implementation == "reference":
        return op._reference(*args)
    if implementation == "triton":
        return op._triton(*args)  # the CUDA kernel, here interpreted on CPU tensors
    from kvpack.attention import cpu

    cpu.extension()
    return torch.ops.kvpack.packed_attention(*args)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_implementation_matches_the_definition(case: Case, implementation: str) -> None:
    inputs, query = case.inputs(), case.query()
    masked = query.shape[2] > 1  # the operator's None bias means no mask at all; decode steps (one query) need none
    mask, args = _call(query, inputs, masked, case)
    expected = attention_definition(query, inputs, mask, case.scaling)
    out = _run(implementation, args)
    assert out.shape == (query.shape[0], query.shape[2], query.shape[1], inputs.exact_values.shape[3])
    assert out.dtype == query.dtype
    assert_close_to_definition(out, expected, case.tolerance(inputs))


@pytest.mark.skipif(why_unavailable("cpu") is not None, reason=str(why_unavailable("cpu")))
@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_the_cpu_kernel_is_what_the_operator_runs_on_cpu(case: Case) -> None:
    from kvpack.attention import cpu

    kernel = cpu.extension()
    _, args = _call(case.query(), case.inputs(), False, case)
    assert torch.equal(torch.ops.kvpack.packed_attention(*args), kernel.packed_attention(*args))


def test_nbytes_counts_what_attention_reads() -> None:
    """Packed codes, scales and zeros of keys and values, and the exact tokens: what the benchmarks divide by time."""
    inputs = Case.parse("k4v2-g16 h2x1 p2 e3").inputs()
    assert inputs.packed_keys is not None and inputs.packed_values is not None
    packed = [*inputs.packed_keys.parts().values(), *inputs.packed_values.parts().values()]
    expected = sum(t.numel() * t.element_size() for t in [*packed, inputs.exact_keys, inputs.exact_values])
    assert inputs.nbytes == expected > inputs.exact_keys.nbytes + inputs.exact_values.nbytes


@pytest.mark.parametrize("case", CASES, ids=str)
def test_arguments_stand_for_the_same_inputs(case: Case) -> None:
    """What the Python implementations rebuild from the operator's arguments is the inputs they were made of: the
    same tensors, and the same specs (rotation and codebook recovered from the matrices and levels)."""
    inputs = case.inputs()
    args = op.arguments(case.query(), inputs, None, case.scaling)
    _, rebuilt, _, _ = op._split(args)
    assert rebuilt.sink_len == inputs.sink_len
    assert torch.equal(rebuilt.exact_keys, inputs.exact_keys) and torch.equal(rebuilt.exact_values, inputs.exact_values)
    for mine, theirs in ((rebuilt.packed_keys, inputs.packed_keys), (rebuilt.packed_values, inputs.packed_values)):
        if theirs is None:
            assert mine is None
            continue
        assert mine is not None
        assert mine.spec.bits == theirs.spec.bits and mine.spec.group_size == theirs.spec.group_size
        assert (mine.spec.rotation, mine.spec.codebook) == (theirs.spec.rotation, theirs.spec.codebook)
        assert mine.shape == theirs.shape
        assert all(torch.equal(a, b) for a, b in zip(mine.parts().values(), theirs.parts().values(), strict=True))


def _with_spare_capacity(inputs: AttentionInputs, extra: int) -> tuple[AttentionInputs, tuple[int, int]]:
    """The same tokens at the start of buffers `extra` storage units longer, the spare part NaN (codes 255)."""

    def grow(t: torch.Tensor) -> torch.Tensor:
        fill = float("nan") if t.is_floating_point() else 255
        big = torch.full((*t.shape[:2], t.shape[2] + extra, *t.shape[3:]), fill, dtype=t.dtype)
        big[:, :, : t.shape[2]] = t
        return big

    pk, pv = inputs.packed_keys, inputs.packed_values
    assert pk is not None and pv is not None
    grown_k = PackedTensor(grow(pk.codes), grow(pk.scale), grow(pk.zero), pk.shape, pk.spec)
    grown_v = PackedTensor(grow(pv.codes), grow(pv.scale), grow(pv.zero), pv.shape, pv.spec)
    grown = AttentionInputs(grow(inputs.exact_keys), grow(inputs.exact_values), grown_k, grown_v, inputs.sink_len)
    return grown, (inputs.exact_keys.shape[2], pk.shape[2])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reads_only_the_valid_tokens_of_larger_buffers(implementation: str) -> None:
    """A layer passes its buffers whole (no slicing per step): the tokens past `exact_tokens` and `packed_tokens`
    are never read (here NaN: any read would show)."""
    case = Case.parse("k4v2-plain-g32-s2-rot h2x2 p3 e4")
    inputs, query = case.inputs(), case.query()
    grown, (exact, packed) = _with_spare_capacity(inputs, extra=5)
    args = list(op.arguments(query, grown, None, case.scaling))
    args[3], args[11] = exact, packed  # exact_tokens, packed_tokens: the valid part only
    out = _run(implementation, tuple(args))
    expected = attention_definition(query, inputs, None, case.scaling)
    assert_close_to_definition(out, expected, case.tolerance(inputs))


@pytest.mark.skipif(why_unavailable("cpu") is not None, reason=str(why_unavailable("cpu")))
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=str)
def test_operator_passes_torch_library_checks(case: Case) -> None:
    """torch's own checks of a custom operator: its schema, the fake (tracing) implementation's shapes and dtypes
    against the real kernel, and tracing through AOT dispatch (what torch.compile and export do)."""
    from kvpack.attention import cpu

    cpu.extension()
    _, args = _call(case.query(), case.inputs(), True, case)
    torch.library.opcheck(torch.ops.kvpack.packed_attention.default, args)


@pytest.mark.parametrize("backend", backend_params("cpu", "torch"))
def test_backend_is_resolved_once_per_layer_not_per_step(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(num_hidden_layers=2)
    registry.use_kvpack_attention(model)
    resolved: list[str] = []
    resolve = registry.resolve_backend

    def counting(inputs: AttentionInputs) -> str:
        resolved.append(inputs.backend)
        return resolve(inputs)

    monkeypatch.setattr(registry, "resolve_backend", counting)
    cache = KVPackCache(model.config, "k4v4-r16-g16", backend=backend)
    ids = prompt(tokens=40)
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60, do_sample=False,
            **cache_kwargs(model, cache),
        )  # fmt: skip
    layers = model.config.num_hidden_layers
    # Per layer at most twice: before its first packed block and after (60 fused steps per layer ran).
    assert 0 < len(resolved) <= 2 * layers
    assert set(resolved) == {backend}
