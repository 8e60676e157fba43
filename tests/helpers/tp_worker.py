"""One rank of tests/cache/test_devices.py's tensor-parallel test: run under `torchrun --nproc-per-node N` with the
model directory and an output directory as arguments. Loads the model with transformers' tensor parallelism
(`tp_plan="auto"`, gloo on CPU), generates greedily with a DynamicCache and with kvpack caches (dense and fused), and
writes what it saw as `rank<R>.json`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvpack import KVPackCache, use_kvpack_attention
from kvpack.cache.layer import PackedLayer
from kvpack.compat import cache_kwargs


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    result: dict[str, object] = {"world_size": int(os.environ["WORLD_SIZE"])}
    result["fp"] = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kwargs)[0].tolist()
    for name in ("dense", "fused"):
        if name == "fused":
            use_kvpack_attention(model)
        cache = KVPackCache(model, "k8v8-g16-r16", backend="dense" if name == "dense" else "auto")
        result[name] = model.generate(ids, **cache_kwargs(model, cache), **kwargs)[0].tolist()
        layers = [layer for layer in cache.layers if isinstance(layer, PackedLayer)]
        result[f"{name}_kv_heads"] = [layer.residual_keys.shape[1] for layer in layers]
        result[f"{name}_packed"] = [layer.packed_length for layer in layers]
        result[f"{name}_nbytes"] = cache.nbytes()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
