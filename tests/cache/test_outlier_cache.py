"""Caches with outliers (`-o<k>`): `nbytes` counts them exactly, and saved files round-trip them bit for bit and
refuse forged positions. (Their buffers against DynamicCache: tests/cache/test_cache_properties.py; attention over
them: tests/attention/test_backends.py and test_fused_cache.py; the format: tests/quant/test_outliers.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from kvpack import CacheFormatError, KVPackCache, prefix_cache
from kvpack.cache.layer import PackedLayer
from kvpack.cache.persist import read_cache_file
from kvpack.cache.plan import packed_bytes
from kvpack.compat import cache_kwargs
from kvpack.errors import CacheFileError
from tests.helpers.generation import continue_steps
from tests.helpers.models import prompt
from tests.helpers.states import assert_same_states

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPECS = ["k4v2-g16-r16-o1", "k2v3-g16-r16-s3-ok2", "k3v2-gk32-gv16-r16-ov4", "k2v2-g16-r0-o2-rot", "k3v3-g16-r32-kt-o1"]


@pytest.mark.parametrize("spec", SPECS)
def test_nbytes_counts_the_outliers_exactly(llama: PreTrainedModel, spec: str) -> None:
    cache = KVPackCache(llama, spec)
    with torch.no_grad():
        llama(prompt(batch=2, tokens=90, seed=2), **cache_kwargs(llama, cache))
        for i in range(40):  # decode steps: appends into grown capacity
            llama(prompt(batch=2, tokens=1, seed=i), **cache_kwargs(llama, cache))
    total = 0
    for layer in cache.layers:
        assert isinstance(layer, PackedLayer) and layer.packed_length > 0
        assert layer.packed_keys is not None and layer.packed_values is not None
        for buffer, config_spec in ((layer.packed_keys, layer.config.key), (layer.packed_values, layer.config.value)):
            view = buffer.view()
            assert list(view.parts()) == ["codes", "scale", "zero"] + (
                ["outlier_values", "outlier_positions"] if config_spec.outliers else []
            )
            rows = view.shape[0] * view.shape[1]
            assert view.nbytes == rows * packed_bytes(config_spec, layer.packed_length, view.shape[-1])
            # The buffer: every stored tensor at its capacity (outliers shaped like scale, one more dimension).
            held = [buffer.codes, buffer.scale, buffer.zero]
            if config_spec.outliers:
                assert buffer.outlier_values is not None and buffer.outlier_positions is not None
                assert buffer.outlier_values.shape == (*buffer.scale.shape, config_spec.outliers)
                assert buffer.outlier_values.dtype == torch.float16
                assert buffer.outlier_positions.shape == buffer.outlier_values.shape
                assert buffer.outlier_positions.dtype == torch.uint8
                held += [buffer.outlier_values, buffer.outlier_positions]
            else:
                assert buffer.outlier_values is None and buffer.outlier_positions is None
            assert buffer.nbytes() == sum(t.numel() * t.element_size() for t in held)
        dense = (layer.sink_keys, layer.sink_values, layer.residual_keys, layer.residual_values, layer.shadow_keys,
                 layer.shadow_values)  # fmt: skip
        total += sum(t.numel() * t.element_size() for t in dense) + layer.packed_keys.nbytes()
        total += layer.packed_values.nbytes()
    assert cache.nbytes() == total


@pytest.mark.parametrize("tokens", [1, 37, 100])
@pytest.mark.parametrize("spec", SPECS)
def test_saved_outliers_round_trip_bit_exact(model: PreTrainedModel, spec: str, tokens: int, tmp_path: Path) -> None:
    ids = prompt(batch=2, tokens=tokens, seed=tokens)
    original = prefix_cache(model, ids, spec)
    original.save(tmp_path / "c.kvpc", model)
    loaded = KVPackCache.load(tmp_path / "c.kvpc", model)
    assert_same_states(original, loaded)  # every tensor, outliers included, bit for bit
    more = prompt(batch=2, tokens=40, seed=99)
    for a, b in zip(continue_steps(model, original, more), continue_steps(model, loaded, more), strict=True):
        assert torch.equal(a, b)
    assert_same_states(original, loaded)


def test_saved_file_holds_the_outlier_tensors(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = prefix_cache(llama, prompt(tokens=70, seed=1), "k4v4-g16-r16-ok2")
    cache.save(tmp_path / "c.kvpc", llama)
    tensors = read_cache_file(tmp_path / "c.kvpc").tensors
    assert tensors["layers.0.packed_keys.outlier_values"].shape == (1, 2, 48 // 16, 16, 2)
    assert tensors["layers.0.packed_keys.outlier_values"].dtype == torch.float16
    assert tensors["layers.0.packed_keys.outlier_positions"].dtype == torch.uint8
    assert not any("packed_values.outlier" in name for name in tensors)  # values keep no outliers here


@pytest.mark.parametrize("forged", [16, "repeat"])
def test_forged_outlier_positions_are_refused(llama: PreTrainedModel, tmp_path: Path, forged: int | str) -> None:
    """A file whose outlier positions fall outside their group or repeat one is refused, checksum valid or not."""
    path = tmp_path / "c.kvpc"
    cache = prefix_cache(llama, prompt(tokens=70, seed=1), "k4v4-g16-r16-o2")
    positions = cache.layers[1].packed_values.outlier_positions
    assert positions is not None
    first_group = positions[0, 0, 0, 0]  # the second position of the first group is forged, then the file signed
    first_group[1] = first_group[0] if forged == "repeat" else int(forged)
    cache.save(path, llama)
    with pytest.raises(CacheFileError) as info:
        KVPackCache.load(path, llama)
    error = info.value
    assert str(path) in str(error)
    assert isinstance(error, CacheFormatError) and error.check == "layers" and "outlier positions" in str(error)
