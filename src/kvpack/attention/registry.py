"""The one attention entry point, its backends, and its registration with transformers.

    from kvpack.attention import use_kvpack_attention
    use_kvpack_attention(model)                  # the model's attention becomes "kvpack"
    model.generate(..., cache=KVPackCache(model, "k4v4"))       # past_key_values= before transformers 5.25

With the model's attention implementation set to `kvpack`, a `KVPackCache` hands each layer's packed blocks and
exact tokens to `kvpack_attention` instead of dequantized tensors, and one backend computes attention on them:

    torch    the pure-torch reference (`reference_attention`), everywhere
    cpu      the fused C++ kernel (`kvpack.attention.cpu`), built on first use; CPU tensors, KIVI layout
    numba    the fused numba kernel (`kvpack.attention.numba_cpu`), for machines without a C++ compiler
    triton   the Triton kernel (`kvpack.attention.triton_gpu`); CUDA tensors, KIVI layout (CPU tensors only under
             TRITON_INTERPRET=1, for tests)
    auto     for CUDA tensors triton, for CPU tensors the first of cpu and numba that applies, else torch; says
             once on stderr why it passed one over

Anything else (a `DynamicCache`, a sliding-window layer, the first prefill) reaches `kvpack_attention` as plain
tensors and goes to transformers' SDPA attention, so setting the implementation never changes other caches.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch

from kvpack.attention.inputs import INPUTS_ATTRIBUTE, AttentionInputs
from kvpack.attention.reference import reference_attention
from kvpack.errors import BackendUnavailableError, ConfigError, UnsupportedOperationError

ATTENTION_NAME = "kvpack"
BACKENDS = ("auto", "torch", "cpu", "numba", "triton")
# What `auto` tries, in order, per device type of the cache, before the torch reference.
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("cpu", "numba")}
# What a `KVPackCache` accepts: a backend, or `dense` (dequantize in the cache; the model's attention reads it).
CACHE_BACKENDS = (*BACKENDS, "dense")

_fallbacks_said: set[str] = set()


def check_backend(backend: str) -> str:
    """Validate a cache's backend name; raises ConfigError listing the names."""
    if backend not in CACHE_BACKENDS:
        raise ConfigError(f"attention backend {backend!r}: use one of {', '.join(CACHE_BACKENDS)}.")
    return backend


def _why_not(backend: str, inputs: AttentionInputs) -> str | None:
    """None when `backend` can compute `inputs` here, else why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        from kvpack.attention import cpu

        return cpu.why_unavailable() or cpu.supports(inputs)
    if backend == "triton":
        from kvpack.attention import triton_gpu  # does not import triton itself

        return triton_gpu.why_unavailable() or triton_gpu.supports(inputs)
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    from kvpack.attention import numba_cpu  # imports numba: only once a fused step needs it

    return numba_cpu.supports(inputs)


def _say_once(message: str) -> None:
    if message not in _fallbacks_said:
        _fallbacks_said.add(message)
        print(f"kvpack: {message}", file=sys.stderr, flush=True)


def resolve_backend(inputs: AttentionInputs) -> str:
    """The backend that computes `inputs`: the one asked for, or for `auto` the first that applies of those in
    `AUTO_ORDER` for the cache's device, else torch (saying once on stderr why a faster one was passed over).

    Raises BackendUnavailableError when an explicitly requested backend cannot run these inputs.
    """
    asked = check_backend(inputs.backend)
    if asked == "dense":
        raise ValueError("a dense cache never hands packed inputs to attention")
    if asked != "auto":
        why_not = _why_not(asked, inputs)
        if why_not is not None:
            raise BackendUnavailableError(f"attention backend {asked!r} cannot run here: {why_not}. Use 'auto'.")
        return asked
    for backend in AUTO_ORDER.get(inputs.exact_keys.device.type, ()):
        why_not = _why_not(backend, inputs)
        if why_not is None:
            return backend
        _say_once(f"attention backend {backend!r} skipped: {why_not}.")
    return "torch"


def prepare(backend: str) -> None:
    """Build or load what `backend` needs now (the CPU kernel compiles on first use), so no timed step pays it.

    Triton compiles a kernel per shape class at its first launch; that cannot be done ahead without the shapes,
    so `triton` prepares nothing.
    """
    if check_backend(backend) in ("auto", "cpu"):
        from kvpack.attention import cpu

        if cpu.why_unavailable() is None:
            cpu.extension()


Runner = Callable[[torch.Tensor, AttentionInputs, "torch.Tensor | None", float], torch.Tensor]


def runner(backend: str, inputs: AttentionInputs) -> Runner:
    """The function that computes attention with `backend` for the layer `inputs` come from (the CPU kernel's
    prepares the layer's constants once; triton's is the `kvpack::packed_attention` operator's CUDA kernel, called
    directly so that it also runs interpreted on CPU tensors)."""
    if backend == "cpu":
        from kvpack.attention import cpu

        return cpu.runner(inputs)
    if backend == "numba":
        from kvpack.attention import numba_cpu

        return numba_cpu.numba_attention
    if backend == "triton":
        from kvpack.attention import triton_gpu

        return triton_gpu.triton_attention
    return reference_attention


def attend(query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of `query` `[batch, heads, queries, head_dim]` over one layer's packed and exact tokens.

    mask: transformers' mask `[batch, 1, queries, tokens]` (boolean or additive) or None (causal among the new
    tokens). Returns `[batch, queries, heads, value_dim]` in the query's dtype. The backend is resolved once per
    layer (`inputs.memo`) and whether it holds packed tokens yet.
    """
    memo = inputs.memo
    key = (inputs.backend, inputs.packed_keys is None, inputs.exact_keys.device)
    run = None if memo is None else memo.get(key)
    if run is None:
        run = runner(resolve_backend(inputs), inputs)
        if memo is not None:
            memo[key] = run
    return run(query, inputs, mask, scaling)


def describe() -> list[str]:
    """What this machine offers each backend, and which one `auto` picks for a cache in the KIVI layout."""
    import platform
    from importlib.metadata import version

    import torch

    from kvpack.attention import cpu, triton_gpu

    model, simd = cpu.cpu_model(), cpu.cpu_simd()
    lines = [
        f"machine: {platform.machine()} {model}".rstrip(),
        f"SIMD: {', '.join(simd) or 'none detected'} (the cpu kernel is compiled with -march=native for exactly this)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CUDA: "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    ]
    why_cpu = cpu.why_unavailable()
    if why_cpu is None:
        # Builds the kernel if this machine has not yet (once, announced on stderr): its code path is the answer.
        kernel, threads = cpu.extension(), torch.get_num_threads()
        lines.append(
            f"backend cpu: available, compiler {cpu.compiler()}, code path {kernel.simd_path()}, "
            f"{kernel.parallel_threads(64)} of torch's {threads} threads (OpenMP build)"
        )
        if not kernel.integer_products():
            integer = "not in this build (needs AVX-512 VNNI and VBMI): floating point throughout"
        elif cpu.integer_products:
            integer = "on (2- and 4-bit uniform codes; KVPACK_INTEGER_PRODUCTS=1)"
        else:
            integer = "built, off (the default; KVPACK_INTEGER_PRODUCTS=1 turns it on)"
        lines.append(f"cpu kernel integer products (AVX-512 VNNI): {integer}")
    else:
        lines.append(f"backend cpu: {why_cpu}")
    numba_spec = importlib.util.find_spec("numba")
    lines.append("backend numba: " + ("available" if numba_spec is not None else "numba is not installed"))
    why_triton = triton_gpu.why_unavailable()
    if why_triton is None:
        how = "CUDA" if torch.cuda.is_available() else "interpreted on CPU tensors: TRITON_INTERPRET is set"
        lines.append(f"backend triton: available, triton {version('triton')} ({how})")
    else:
        lines.append(f"backend triton: {why_triton}")
    lines.append("backend torch: always available (the reference)")
    chosen = "cpu" if why_cpu is None else "numba" if numba_spec is not None else "torch"
    lines.append(f"auto picks: {chosen} (for CPU tensors in the KIVI layout; prefills and sliding layers stay dense)")
    if torch.cuda.is_available():
        cuda_choice = "triton" if why_triton is None else "torch"
        lines.append(f"for CUDA tensors auto picks: {cuda_choice} (KIVI layout, head dims multiples of 16 up to 256)")
    return lines


def kvpack_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; packed inputs go to `attend`, plain tensors to SDPA."""
    inputs = getattr(key, INPUTS_ATTRIBUTE, None)
    if inputs is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
        raise UnsupportedOperationError(
            "kvpack attention does not implement logit soft-capping, attention sinks (s_aux) or dropout; use the "
            "model's own attention implementation (e.g. attn_implementation='sdpa') with this model."
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return attend(query, inputs, attention_mask, scaling), None


def register() -> None:
    """Make `attn_implementation="kvpack"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvpack_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_kvpack_attention(model: Any) -> Any:
    """Switch `model`'s attention implementation to kvpack's (see the module doc); returns the model."""
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    return model
