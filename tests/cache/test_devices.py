"""Where one device is not enough: the cache follows each layer's device (accelerate's `device_map`), and each rank of
transformers' tensor parallelism (`tp_plan`) holds its own heads' cache.

What runs here (no GPU): a model dispatched by accelerate with an explicit per-layer `device_map` (CPU, one layer
offloaded to disk: the hooks and the dispatch path are exercised, one compute device only); a meta-device check that
each layer initialises on the device of the tensors it receives (so layers on different devices each keep their own);
and tensor parallelism over two CPU processes with gloo under `torchrun`. What needs a GPU runs only where CUDA is
present: a model split between cuda:0 and the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from kvpack import KVPackCache, use_kvpack_attention
from kvpack.compat import cache_kwargs
from tests.helpers.generation import assert_same_greedy
from tests.helpers.models import llama_config, prompt, tiny_llama
from tests.helpers.states import packed_layers

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPEC = "k8v8-g16-r16"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def greedy(model: PreTrainedModel, cache: Any, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20, do_sample=False, pad_token_id=0)


def layer_map(devices: list[str]) -> dict[str, str]:
    """An explicit accelerate device_map of the tiny Llama: layer i on devices[i], the rest with the first/last."""
    mapping = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    mapping |= {f"model.layers.{i}": device for i, device in enumerate(devices)}
    return mapping | {"model.norm": devices[-1], "lm_head": devices[-1]}


def test_cache_under_an_accelerate_device_map(model_dir: Path, tmp_path: Path) -> None:
    # transformers dispatches with accelerate's hooks only for several devices or disk offload: layer 1 is offloaded
    # to disk (its weights come in through the hooks at each forward), everything else is on the CPU.
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    device_map = layer_map(["cpu", "disk"])
    mapped = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=tmp_path).eval()
    assert mapped.hf_device_map == device_map
    assert hasattr(mapped.model.layers[1], "_hf_hook")  # dispatched by accelerate
    ids = prompt()
    expected = greedy(plain, KVPackCache(plain, SPEC), ids)
    for backend in ("dense", "auto"):
        if backend == "auto":
            use_kvpack_attention(mapped)
        cache = KVPackCache(mapped, SPEC, backend=backend)
        assert torch.equal(greedy(mapped, cache, ids), expected)
        assert all(layer.packed_length > 0 and layer.device.type == "cpu" for layer in packed_layers(cache))


def test_each_layer_keeps_the_device_of_its_own_tensors() -> None:
    # Layer 0 on the CPU, layer 1 on the meta device (a stand-in for a second device: tensors without storage).
    # Nothing is packed here (the default residual of 128 tokens), as quantizing reads values.
    cache = KVPackCache(llama_config(), "k4v4-g16")
    for idx, device in enumerate(("cpu", "meta")):
        keys = torch.randn(2, 2, 40, 16).to(device)
        cache.update(keys, keys.clone(), idx)
    layers = packed_layers(cache)
    assert [layer.device.type for layer in layers] == ["cpu", "meta"]
    assert all(t.device.type == "meta" for t in (layers[1].residual_keys, layers[1].sink_keys))
    assert all(
        t.device.type == "meta" for buf in (layers[1].packed_keys, layers[1].packed_values) for t in buf._tensors()
    )
    cache.reorder_cache(torch.tensor([1, 0]))  # beam indices move to each layer's device
    assert [layer.device.type for layer in layers] == ["cpu", "meta"] and cache.get_seq_length() == 40
    assert cache.nbytes() == sum(layer.nbytes() for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="untested here: needs a CUDA device")
def test_model_split_between_gpu_and_cpu(model_dir: Path) -> None:
    split = AutoModelForCausalLM.from_pretrained(model_dir, device_map=layer_map(["cuda:0", "cpu"])).eval()
    ids = prompt().to("cuda:0")
    kwargs: dict[str, Any] = dict(max_new_tokens=20, return_dict_in_generate=True, output_logits=True)
    reference = split.generate(ids, **cache_kwargs(split, DynamicCache(config=split.config)), do_sample=False, **kwargs)
    cache = KVPackCache(split, SPEC)
    packed = split.generate(ids, **cache_kwargs(split, cache), do_sample=False, **kwargs)
    assert [layer.device.type for layer in packed_layers(cache)] == ["cuda", "cpu"]
    assert_same_greedy(reference, packed, ids.shape[1])


@pytest.mark.slow
def test_tensor_parallel_ranks_hold_their_own_heads(model_dir: Path, tmp_path: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = prompt()
    reference = greedy(plain, DynamicCache(config=plain.config), ids)[0].tolist()
    single = KVPackCache(plain, SPEC)
    single_tokens = greedy(plain, single, ids)[0].tolist()
    worker = Path(__file__).parents[1] / "helpers" / "tp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # A session of its own, so that a hang kills the launcher and its workers together.
    launcher = subprocess.Popen(
        [*command, str(worker), str(model_dir), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    kv_heads = llama_config().num_key_value_heads
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["fp"] == reference  # tensor parallelism itself reproduces the single-process model
        assert rank["dense"] == rank["fused"] == single_tokens  # and so does kvpack under it
        # Each rank caches its own half of the KV heads, so half the bytes of the single-process cache.
        assert rank["dense_kv_heads"] == rank["fused_kv_heads"] == [kv_heads // 2] * 2
        assert all(n > 0 for n in rank["dense_packed"])
        assert rank["dense_nbytes"] * 2 == single.nbytes()
