"""Caches with codebooks and clipped ranges inside generation: the fused path computes what the dense path does."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from kvpack import KVPackCache
from kvpack.attention import cpu
from tests.attention.test_fused_cache import FUSED_LOGIT_TOL, step_logits
from tests.cache.test_cache import llama_config, prompt

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
READERS = ["torch"] + ["cpu"] * (cpu.why_unavailable() is None)


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("spec", ["k4v2-g16-r16-cb-clip", "k2v4-g16-r0-s2-rot-cb-clip", "k8v3-g16-r16-cbv-clipk"])
def test_codebook_caches_match_the_dense_path(llama: PreTrainedModel, spec: str, backend: str) -> None:
    ids = prompt(batch=2, tokens=70, seed=7)
    dense = step_logits(llama, KVPackCache(llama, spec), ids, prefill=37, fused=False)
    cache = KVPackCache(llama, spec, backend=backend)
    fused = step_logits(llama, cache, ids, prefill=37, fused=True)
    assert (fused - dense).abs().max().item() <= FUSED_LOGIT_TOL
    assert all(layer.packed_length > 0 for layer in cache.layers if hasattr(layer, "packed_length"))


def test_a_codebook_changes_the_cache(llama: PreTrainedModel) -> None:
    """The option reaches the stored data (not silently ignored): other reconstructions, other logits."""
    ids = prompt(batch=1, tokens=60, seed=8)
    plain = step_logits(llama, KVPackCache(llama, "k2v2-g16-r0"), ids, prefill=37, fused=False)
    coded = step_logits(llama, KVPackCache(llama, "k2v2-g16-r0-cb"), ids, prefill=37, fused=False)
    assert not torch.equal(plain, coded)
