"""Prefill cost of kvpack caches vs DynamicCache, as CPU time of one thread, interleaved and repeated.

`kvpack bench decode` times each prefill once, in wall-clock seconds, which another process on the machine can
double. This measures the same prefill (same random tokens, the fused path registered, as in the decode bench)
in process CPU time with one torch thread, round after round across caches, and reports each cache's best round
and its ratio to fp's best.

    python benchmarks/prefill_cpu_time.py --contexts 1024,8173 --rounds 2 --out benchmarks/results/prefill_cpu_time.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from kvpack.attention import use_kvpack_attention
from kvpack.attention.registry import prepare
from kvpack.harness.caches import make_cache, parse_cache_name, prefill
from kvpack.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", default="fp,k4v4,k2v2")
    parser.add_argument("--contexts", default="1024,8173")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_cpu_time.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(None)
    use_kvpack_attention(model)
    specs = [parse_cache_name(name) for name in args.caches.split(",")]
    for spec in specs:
        prepare(spec.backend)
    lines = [
        "# Prefill CPU time: kvpack caches vs DynamicCache",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; machine: {platform.platform()},"
        f" 1 torch thread; torch {torch.__version__}",
        f"- command: `python benchmarks/prefill_cpu_time.py --caches {args.caches} --contexts {args.contexts}"
        f" --rounds {args.rounds}`",
        "- process CPU seconds of one prefill of the same random tokens, best of the rounds (interleaved)",
        "",
        "| context | cache | CPU s per round | best | vs fp |",
        "|---|---|---|---|---|",
    ]
    for context in [int(c) for c in args.contexts.split(",")]:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(100, model.config.vocab_size - 100, (1, context), generator=generator)
        with torch.no_grad():  # first use of each cache type, untimed
            for spec in specs:
                prefill(model, ids[:, :256], spec, make_cache(spec, model.config))
        seconds: dict[str, list[float]] = {spec.name: [] for spec in specs}
        for _ in range(args.rounds):
            for spec in specs:
                cache = make_cache(spec, model.config)
                start = time.process_time()
                prefill(model, ids, spec, cache)
                seconds[spec.name].append(time.process_time() - start)
        fp = min(seconds[specs[0].name])
        for name, values in seconds.items():
            rounds = " / ".join(f"{v:.2f}" for v in values)
            lines.append(f"| {context} | {name} | {rounds} | {min(values):.2f} | {min(values) / fp:.2f}x |")
        print("\n".join(lines[-len(specs) :]), flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
