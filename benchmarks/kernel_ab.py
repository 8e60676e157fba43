"""The C++ attention kernel before and after a change, side by side in one process.

Builds `csrc/packed_attention.cpp` twice with the flags `kvpack.attention.cpu` uses (-O3, OpenMP, -march=native):
as it is at git revision `--before` and as it is at `--after` (default: the working tree), then times one call of
each on decode inputs of the default model's shape (every KV head, one new token) in turn, rotating over `--layers`
different layer caches and reading `--evict-mib` MiB before each call (untimed; as a decode step's weights do), so
the data comes from memory, at each context and thread count. Reported: µs per call (median), GB/s of cache bytes
read, the read bandwidth measured in the same run, the ratio before/after, and the largest difference between the
two outputs.

    python benchmarks/kernel_ab.py --before HEAD --out benchmarks/results/kernel_ab.json
    python benchmarks/kernel_ab.py --before 8a374d8 --after 04b4eb3 --out ...   # a committed change, as it was
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from key_rotation import result_header, write  # (benchmarks/ is the script's folder)

from kvpack.attention import cpu, op
from kvpack.bench.decode import layer_inputs, read_bandwidth
from kvpack.cache.plan import cache_shape
from kvpack.harness.results import markdown_table, parse_int_list
from kvpack.models import load_model

SOURCE = "src/kvpack/attention/csrc/packed_attention.cpp"


def kernel_source(revision: str | None, workdir: Path) -> tuple[str, Path]:
    """(what it is, path) of the kernel's source at git `revision`, or in the working tree for None."""
    if revision is None:
        return "the working tree", Path(SOURCE)
    short = subprocess.run(["git", "rev-parse", "--short", revision], capture_output=True, text=True, check=True)
    shown = subprocess.run(["git", "show", f"{revision}:{SOURCE}"], capture_output=True, check=True)
    workdir.mkdir(parents=True)
    (workdir / "packed_attention.cpp").write_bytes(shown.stdout)
    return f"git {short.stdout.strip()}", workdir / "packed_attention.cpp"


def build(name: str, source: Path) -> Any:
    """The kernel compiled from `source` (cached by content), as cpu.extension builds it but registering no op."""
    from torch.utils.cpp_extension import load

    flags = cpu.build_flags()  # (without -DKVPACK_REGISTER_OP: the operator keeps the default build's kernel)
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    print(f"building the {name} kernel ({key}) ...", file=sys.stderr, flush=True)
    return load(name=f"kvpack_ab_{key}", sources=[str(source)], extra_cflags=flags, extra_ldflags=cpu.OPENMP_FLAGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="HEAD", help="git revision of the kernel to compare against (HEAD)")
    parser.add_argument("--after", default=None, help="git revision of the changed kernel (default: the working tree)")
    parser.add_argument("--spec", default="k4v4")
    parser.add_argument("--contexts", default="4096,8173", help="tokens in the cache (default %(default)s)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (default %(default)s)")
    parser.add_argument("--layers", type=int, default=30, help="layer caches rotated over (default 30)")
    parser.add_argument("--rounds", type=int, default=300, help="calls of each kernel per cell (default 300)")
    parser.add_argument(
        "--evict-mib", type=int, default=128, help="MiB read (untimed) before each call, larger than the CPU's caches"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel_ab.json"))
    args = parser.parse_args()
    contexts, thread_counts = parse_int_list(args.contexts, "--contexts"), parse_int_list(args.threads, "--threads")
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as workdir:
        sources = {
            name: kernel_source(rev, Path(workdir) / name)
            for name, rev in (("before", args.before), ("after", args.after))
        }
        kernels = {name: build(name, source) for name, (_, source) in sources.items()}
    model, _ = load_model(None, verbose=False)
    config = model.config
    del model
    shape = cache_shape(config)
    evict = torch.ones(args.evict_mib << 18)  # float32: 4 bytes each
    rows = []
    result = {
        **result_header("kernel_ab.py"),
        "before": sources["before"][0],
        "after": sources["after"][0],
        "spec": args.spec,
        "shape": {"kv_heads": shape.kv_heads, "query_heads": shape.attention_heads, "head_dim": shape.head_dim},
        "rows": rows,
    }
    for context in contexts:
        inputs, _, _ = layer_inputs(config, args.spec, context, args.layers, seed=context)
        query = torch.randn(1, shape.attention_heads, 1, shape.head_dim, generator=torch.Generator().manual_seed(0))
        calls = [op.arguments(query, layer, None, shape.head_dim**-0.5) for layer in inputs]
        nbytes = inputs[0].nbytes
        for threads in thread_counts:
            torch.set_num_threads(threads)
            difference = max(
                (kernels["after"].packed_attention(*c) - kernels["before"].packed_attention(*c)).abs().max().item()
                for c in calls
            )
            seconds: dict[str, list[float]] = {name: [] for name in kernels}
            i = 0
            for _ in range(args.rounds):
                for name, kernel in kernels.items():  # each kernel on another layer in turn: none reads warm data
                    call = calls[i % len(calls)]
                    i += max(1, len(calls) // 4 + 1)
                    evict.sum()  # as a decode step's weights do, push the cache's bytes out of the CPU's caches
                    start = time.perf_counter()
                    kernel.packed_attention(*call)
                    seconds[name].append(time.perf_counter() - start)
            bandwidth = read_bandwidth()["read_gb_s"]
            row: dict[str, Any] = {"context": context, "threads": threads, "bytes": nbytes, "max_abs_diff": difference}
            for name, times in seconds.items():
                median = statistics.median(times)
                row[name] = {"us": median * 1e6, "gb_s": nbytes / median / 1e9}
            row["read_gb_s"] = bandwidth
            row["speedup"] = row["before"]["us"] / row["after"]["us"]
            rows.append(row)
            print(
                f"{context:6d} tokens, {threads} threads: before {row['before']['us']:.0f} µs, after "
                f"{row['after']['us']:.0f} µs ({row['speedup']:.2f}x); {row['after']['gb_s']:.1f} of "
                f"{bandwidth:.1f} GB/s; max |diff| {difference:.1e}",
                file=sys.stderr,
                flush=True,
            )
    torch.set_num_threads(threads_before)
    write(result, args.out, markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    lines = [
        "# The C++ attention kernel before and after, side by side",
        "",
        f"- date: {result['date']}; machine: {result['machine']['platform']}, {result['machine']['cpu']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- command: `{result['command']}`",
        f"- before: {result['before']}; after: {result['after']}",
        f"- inputs: `{result['spec']}` decode attention of the default model's shape ({shape['kv_heads']} KV heads, "
        f"{shape['query_heads']} query heads, head dim {shape['head_dim']}), one new token, each call on another of "
        "the layer caches in turn, each after reading a buffer larger than the CPU's caches; µs per call are "
        "medians; GB/s = cache bytes read per second; read bandwidth measured in the same run, with the same threads",
        "",
    ]
    body = [
        [
            f"{row['context']:,}", str(row["threads"]), f"{row['before']['us']:.0f}", f"{row['after']['us']:.0f}",
            f"{row['speedup']:.2f}x", f"{row['after']['gb_s']:.1f} / {row['read_gb_s']:.1f}",
            f"{row['after']['gb_s'] / row['read_gb_s']:.0%}", f"{row['max_abs_diff']:.1e}",
        ]
        for row in result["rows"]
    ]  # fmt: skip
    header = ["tokens", "threads", "before µs", "after µs", "before/after", "after GB/s / read", "of read"]
    lines += markdown_table([*header, "max abs diff"], body)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
