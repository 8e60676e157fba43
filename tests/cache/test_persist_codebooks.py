"""Saved caches carry `QuantSpec.codebook` and `QuantSpec.clip`: a loaded cache is bit-identical and goes on alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from kvpack import KVPackCache, prefix_cache
from kvpack.quant.codebooks import FITTED_CODEBOOK
from tests.helpers.generation import continue_steps
from tests.helpers.models import prompt
from tests.helpers.states import assert_same_states

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize("spec", ["k4v2-g16-r16-s2-rot-cb-clip", "k8v3-g16-r16-cbv-clipk"])
def test_round_trip_carries_codebook_and_clip(llama: PreTrainedModel, spec: str, tmp_path: Path) -> None:
    ids = prompt(batch=2, tokens=50, seed=12)
    original = prefix_cache(llama, ids, spec)
    original.save(tmp_path / "c.kvpc", llama)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", llama)
    assert loaded.cache_config == original.cache_config
    assert loaded.cache_config.value.codebook == FITTED_CODEBOOK
    assert_same_states(original, loaded)
    more = prompt(batch=2, tokens=40, seed=98)
    for a, b in zip(continue_steps(llama, original, more), continue_steps(llama, loaded, more), strict=True):
        assert torch.equal(a, b)
