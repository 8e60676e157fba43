"""Decode attention on a GPU: kvpack's triton kernel over a packed cache vs float16 SDPA over the same tokens.

    python benchmarks/triton_attention.py            # CUDA: k4v4, batch 8, 32k tokens, Llama-7B heads (32 x 128)
    python benchmarks/triton_attention.py --smoke    # tiny shapes; without a GPU, under Triton's interpreter

One decode step (one new token) of one layer: µs per call (CUDA events, median of `--calls` calls after a
warm-up), the bytes of cache each kernel reads per call and the GB/s that makes, beside this GPU's copy bandwidth
measured in the same run, and the triton output's largest difference from kvpack's torch reference on the same
packed data. Writes JSON (default benchmarks/results/triton_attention.json; `--smoke` writes nothing unless
`--out` is given). Numbers under `--smoke` or the interpreter say nothing about speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--spec",
        default="k4v4",
        help="kvpack cache spec (default k4v4: groups of 64, residual 128, 4 sinks, values rotated)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768, help="tokens in the cache")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=32, help="key/value heads (fewer: grouped-query attention)")
    parser.add_argument("--dim", type=int, default=128, help="head dim")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per kernel")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check that the script runs")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/triton_attention.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.spec, args.batch, args.context, args.heads, args.kv_heads, args.dim, args.calls = (
            "k4v4-g16-r16", 1, 80, 4, 2, 32, 2,
        )  # fmt: skip
    elif args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / "triton_attention.json")
    return args


def timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """A function that gives the median µs of `calls` calls of `fn` on `device`, after three warm-up calls."""

    def median_us(fn: Callable[[], Any], calls: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(calls):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e6)
        return statistics.median(times)

    return median_us


def build_inputs(args: argparse.Namespace, device: torch.device) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The layer's packed cache (`AttentionInputs`) and the same tokens as float16 keys and values."""
    from kvpack.attention.inputs import AttentionInputs
    from kvpack.cache.plan import flushed_tokens
    from kvpack.config import parse_spec
    from kvpack.quant.tensor import PackedTensor

    config = parse_spec(args.spec)
    sinks = min(config.sinks, args.context)
    packed = flushed_tokens(args.context - sinks, config)  # the tokens a streamed cache holds packed
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.kv_heads, args.context, args.dim)
    keys = torch.randn(shape, generator=gen, device=device, dtype=torch.float16)
    values = torch.randn(shape, generator=gen, device=device, dtype=torch.float16)
    packed_keys = packed_values = None
    if packed:
        # One sample at a time: quantizing works in float32, four times the float16 cache at once otherwise.
        parts = [
            (PackedTensor.quantize(keys[i : i + 1, :, sinks : sinks + packed], config.key),
             PackedTensor.quantize(values[i : i + 1, :, sinks : sinks + packed], config.value))
            for i in range(args.batch)
        ]  # fmt: skip

        def joined(tensors: list[PackedTensor]) -> PackedTensor:
            return PackedTensor(
                torch.cat([t.codes for t in tensors]), torch.cat([t.scale for t in tensors]),
                torch.cat([t.zero for t in tensors]), torch.Size((args.batch, *tensors[0].shape[1:])), tensors[0].spec,
            )  # fmt: skip

        packed_keys, packed_values = joined([k for k, _ in parts]), joined([v for _, v in parts])

    def exact(x: torch.Tensor) -> torch.Tensor:  # the sinks, then the residual window
        return torch.cat([x[:, :, :sinks], x[:, :, sinks + packed :]], dim=2)

    inputs = AttentionInputs(exact(keys), exact(values), packed_keys, packed_values, sink_len=sinks, backend="triton")
    return inputs, keys, values


def copy_bandwidth_gb_s(device: torch.device, n_bytes: int, median_us: Callable[..., float]) -> float:
    """GB/s of a device-to-device copy of `n_bytes` (read + write): the memory system's practical peak here."""
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / (median_us(lambda: dst.copy_(src), 5) * 1e-6) / GB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            print("triton_attention: no CUDA GPU here; use --smoke to check the script", file=sys.stderr)
            return 2
        # Before triton is first imported (importing kvpack imports transformers, whose hqq import brings it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    import kvpack
    from kvpack.attention.reference import reference_attention
    from kvpack.attention.registry import attend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs, keys, values = build_inputs(args, device)
    query = torch.randn(args.batch, args.heads, 1, args.dim, device=device, dtype=torch.float16)
    scaling = args.dim**-0.5
    median_us = timer(device)

    packed_bytes = sum(t.nbytes for t in (inputs.packed_keys, inputs.packed_values) if t is not None)
    candidates: dict[str, tuple[Callable[[], Any], int]] = {
        f"kvpack {args.spec} (triton)": (
            lambda: attend(query, inputs, None, scaling),
            packed_bytes + inputs.exact_keys.nbytes + inputs.exact_values.nbytes,
        ),
        "fp16 SDPA": (
            lambda: torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, scale=scaling, enable_gqa=True
            ),
            keys.nbytes + values.nbytes,
        ),
    }
    timings = {name: median_us(fn, args.calls) for name, (fn, _) in candidates.items()}
    sdpa_us = timings["fp16 SDPA"]
    rows = [
        {
            "kernel": name,
            "us_per_call": timings[name],
            "bytes_read": n_bytes,
            "gb_s": n_bytes / (timings[name] * 1e-6) / GB,
            "speed_vs_sdpa": sdpa_us / timings[name],
        }
        for name, (_, n_bytes) in candidates.items()
    ]
    out = attend(query, inputs, None, scaling).float()
    reference = reference_attention(query, inputs, None, scaling).float()
    error = (out - reference).abs().max().item()
    # Both round their float32 result to float16 once: they may differ by a rounding of the largest value each.
    bound = 2 * torch.finfo(torch.float16).eps * values.abs().max().item()
    result = {
        "benchmark": "triton_attention",
        "command": "python benchmarks/triton_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        },
        "versions": {"kvpack": kvpack.__version__, "torch": torch.__version__, "triton": triton.__version__},
        "interpreted": device.type != "cuda",
        "shape": {key: getattr(args, key) for key in ("batch", "context", "heads", "kv_heads", "dim")},
        "spec": args.spec,
        "packed_tokens": inputs.packed_tokens,
        "copy_gb_s": copy_bandwidth_gb_s(device, 1 << (30 if device.type == "cuda" else 20), median_us),
        "rows": rows,
        "max_abs_error_vs_reference": error,
        "error_bound": bound,
    }
    for row in rows:
        print(
            f"{row['kernel']:>28}: {row['us_per_call']:9.1f} µs  {row['bytes_read'] / 1e6:9.1f} MB  "
            f"{row['gb_s']:8.1f} GB/s  {row['speed_vs_sdpa']:.2f}x SDPA"
        )
    print(f"copy bandwidth {result['copy_gb_s']:.0f} GB/s; max |triton - reference| {error:.2e} (bound {bound:.2e})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if error <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
