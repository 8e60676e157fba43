"""Check `kvpack calibrate`'s emulated sensitivity against real streamed runs on the default model.

For each setting (spec, layer): the emulated mean KL when that layer's keys and values are quantized (all else
exact), beside the mean KL of `kvpack.eval.perplexity.stream` with a `KVPackCache` in which only that layer is
packed (every other layer a transformers `DynamicLayer`), both vs the exact model, on the calibration text. Also
the emulated keys-only and values-only KLs and their sum (the allocation's additive model).

    PYTHONPATH=src python scripts/validate_calibration.py --tokens 256 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import kvpack.eval.perplexity as perplexity
from kvpack import KVPackCache, parse_spec
from kvpack.calibrate import SensitivityMeter
from kvpack.harness.caches import parse_cache_name
from kvpack.models import load_model
from kvpack.texts import calibration_data_path, load_tokens

SETTINGS = [("k2v2-g64-r32-s4", 3), ("k2v2-g64-r32-s4", 20), ("k3v3-g64-r32-s4-rot", 10), ("k2v2-s4-rot", 15)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None, verbose=False)
    ids, _ = load_tokens(calibration_data_path(), tokenizer, args.tokens)
    reference, ref_logprobs = perplexity.stream(model, ids, parse_cache_name("fp"), keep_logprobs=True, progress=False)
    make_cache = perplexity.make_cache
    print("| spec | layer | emulated K+V | streamed K+V | rel. gap | emulated K | emulated V | K + V |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, layer in SETTINGS:
        config = parse_spec(spec)
        start = time.perf_counter()
        meter = SensitivityMeter(model, ids, config)
        both = meter.kl(layer, ("key", "value"), config)
        keys, values = meter.kl(layer, ("key",), config), meter.kl(layer, ("value",), config)
        emulated_s = time.perf_counter() - start

        def one_layer_cache(_spec, model_config, layer=layer, config=config):  # type: ignore[no-untyped-def]
            cache = KVPackCache(model_config, config)
            exact = DynamicCache(config=model_config)
            for idx in range(len(cache.layers)):
                if idx != layer:
                    cache.layers[idx] = exact.layers[idx]
            return cache

        perplexity.make_cache = one_layer_cache
        try:
            result, _ = perplexity.stream(
                model, ids, parse_cache_name(spec), reference_logprobs=ref_logprobs, progress=False
            )
        finally:
            perplexity.make_cache = make_cache
        assert result.kl is not None
        streamed = result.kl.double().mean().item()
        print(
            f"| {spec} | {layer} | {both:.4e} | {streamed:.4e} | {both / streamed - 1:+.1e} | {keys:.3e} | "
            f"{values:.3e} | {keys + values:.3e} |  ({emulated_s:.0f} s emulated, {result.seconds:.0f} s streamed)"
        )
    print(f"reference PPL {reference.perplexity:.3f} over {args.tokens} tokens of the calibration text")


if __name__ == "__main__":
    main()
