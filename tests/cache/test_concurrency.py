"""Independent caches used from several threads at once give what they give one after another.

One model, shared read-only by every thread (its attention implementation set before any thread starts); each thread
generates with its own `KVPackCache` from its own prompt. torch releases the GIL inside its own ops (linear layers,
SDPA, the dense path's dequantization), so the threads overlap there; kvpack's C++ and numba kernels hold the GIL, so
their calls interleave between the others'. Each thread's tokens and logits must be bit-identical to
the same generation run alone: no state is shared between caches (packed views, kernel scratch and the attention
backend's per-process caches included). Several rounds, started together on a barrier, for more interleavings.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from kvpack import KVPackCache, use_kvpack_attention
from kvpack.compat import cache_kwargs
from tests.helpers.backends import CPU_KERNELS, backend_params

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

THREADS, ROUNDS = 4, 3


def prompts() -> list[torch.Tensor]:
    # Different lengths, so the threads pack blocks at different steps.
    return [torch.randint(2, 128, (1, 40 + 3 * i), generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]


def run(model: PreTrainedModel, ids: torch.Tensor, backend: str, start: threading.Barrier | None = None) -> Any:
    cache = KVPackCache(model, "k4v4-plain-g16-r16", backend=backend)
    if start is not None:
        start.wait()
    out = model.generate(
        ids,
        **cache_kwargs(model, cache),
        max_new_tokens=40,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits), cache.nbytes()


@pytest.mark.parametrize("backend", backend_params("dense", *CPU_KERNELS))
def test_threads_with_their_own_caches_match_sequential_runs(llama: PreTrainedModel, backend: str) -> None:
    if backend == "dense":
        llama.set_attn_implementation("sdpa")
    else:
        use_kvpack_attention(llama)
    inputs = prompts()
    sequential = [run(llama, ids, backend) for ids in inputs]
    for _ in range(ROUNDS):
        start = threading.Barrier(THREADS)
        with ThreadPoolExecutor(THREADS) as pool:
            concurrent = list(pool.map(run, [llama] * THREADS, inputs, [backend] * THREADS, [start] * THREADS))
        for (seq, logits, nbytes), (c_seq, c_logits, c_nbytes) in zip(sequential, concurrent, strict=True):
            assert torch.equal(c_seq, seq) and torch.equal(c_logits, logits) and c_nbytes == nbytes
    llama.set_attn_implementation("sdpa")
