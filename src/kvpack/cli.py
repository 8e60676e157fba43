"""`kvpack <subcommand>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpack.attention.registry import CACHE_BACKENDS
from kvpack.bench.compare import DEFAULT_CACHES
from kvpack.config import CacheConfig, parse_spec
from kvpack.errors import KVPackError
from kvpack.weights import WEIGHT_CHOICES


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _read_prompt(args: argparse.Namespace) -> str:
    parts = []
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise KVPackError(f"--prompt-file {path} does not exist.")
        parts.append(path.read_text(encoding="utf-8").strip())
    if args.prompt:
        parts.append(args.prompt)
    if not parts:
        raise KVPackError("give a prompt (a positional argument) and/or --prompt-file.")
    return "\n\n".join(parts)


def _encode(tokenizer: Any, prompt: str, chat: bool) -> Any:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


@dataclass
class Generation:
    """New token ids of one `generate` call, with the prefill and decode times measured apart."""

    tokens: Any
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens.numel() / self.decode_s


def _generate(model: Any, inputs: Any, cache: Any, args: argparse.Namespace) -> Generation:
    import torch

    sampling: dict[str, Any] = {"do_sample": False}
    if args.sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():  # not inference_mode: quanto's quantized weights fail on inference tensors
        # Prefill all but the last prompt token, so that generate's own time is the decode alone.
        start = time.perf_counter()
        model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        prefilled = time.perf_counter()
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, **sampling)
        done = time.perf_counter()
    return Generation(tokens=out[0, ids.shape[1] :], prefill_s=prefilled - start, decode_s=done - prefilled)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text with a packed cache and summarise its size and speed."""
    import torch
    from transformers import DynamicCache

    from kvpack.attention import use_kvpack_attention
    from kvpack.attention.registry import prepare
    from kvpack.cache import KVPackCache
    from kvpack.models import load_model
    from kvpack.weights import weight_nbytes

    config = parse_spec(args.cache)
    prompt = _read_prompt(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    inputs = _encode(tokenizer, prompt, chat=not args.no_chat).to(model.device)
    if args.backend != "dense":
        use_kvpack_attention(model)  # the fp cache of --check still goes through SDPA
        prepare(args.backend)
    cache = KVPackCache(model.config, config, backend=args.backend)
    result = _generate(model, inputs, cache, args)
    new_tokens = result.tokens
    print(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    print()
    n_new = int(new_tokens.numel())
    n_prompt = int(inputs["input_ids"].shape[1])
    packed, fp16 = cache.nbytes(), cache.fp16_nbytes()
    model_dtype_bytes = fp16 * torch.finfo(model.dtype).bits // 16
    summary = (
        f"[{config.spec}] prompt {n_prompt} tokens ({result.prefill_s:.1f} s), "
        f"{n_new} new tokens in {result.decode_s:.1f} s ({result.tokens_per_s:.1f} tokens/s); "
        f"cache {_human_bytes(packed)} for {cache.get_seq_length()} tokens: "
        f"{fp16 / packed:.2f}x smaller than a float16 cache ({_human_bytes(fp16)})"
    )
    if model.dtype != torch.float16:
        summary += f", {model_dtype_bytes / packed:.2f}x smaller than this model's {str(model.dtype)[6:]} cache"
    if args.weights != "fp":
        weight_bytes = weight_nbytes(model)
        summary += f"; {args.weights} weights {_human_bytes(weight_bytes)}, total {_human_bytes(weight_bytes + packed)}"
    print(summary)
    if args.check:
        ref = _generate(model, inputs, DynamicCache(config=model.config), args)
        reference = ref.tokens
        same = 0
        for a, b in zip(new_tokens.tolist(), reference.tolist(), strict=False):
            if a != b:
                break
            same += 1
        if same == n_new == reference.numel():
            verdict = f"identical to the full-precision cache's output ({same}/{n_new} tokens)"
        else:
            verdict = (
                f"same as the full-precision cache's output for the first {same} of {reference.numel()} tokens; "
                f"it continues: {tokenizer.decode(reference[same:], skip_special_tokens=True).strip()[:200]!r}"
            )
        print(f"[check] {verdict}; full-precision cache: {ref.tokens_per_s:.1f} tokens/s")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Which attention backend this machine gets, and why."""
    from kvpack.attention.registry import describe

    print("\n".join(describe()))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    """Explain a cache spec string."""
    config: CacheConfig = parse_spec(args.spec)
    print(f"spec: {config.spec}")
    for name, spec in (("keys", config.key), ("values", config.value)):
        print(
            f"  {name}: {spec.bits}-bit codes, per {spec.axis} in groups of {spec.group_size}, "
            f"{spec.bits_per_value:g} bits per value with float16 scale and zero"
        )
    print(f"  residual: newest {config.residual} tokens in full precision; sinks: first {config.sinks} tokens")
    return 0


def _add_measure_options(parser: argparse.ArgumentParser, tokens: int) -> None:
    from kvpack.eval.perplexity import default_data_path

    parser.add_argument("--tokens", type=int, default=tokens, help=f"tokens of the text to stream (default {tokens})")
    parser.add_argument("--data", default=str(default_data_path()), help="text file (default: WikiText-2 test)")
    parser.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--weights",
        default="fp",
        help="weight formats, comma-separated among fp,int8,int4 (optimum-quanto); every cache runs with each, "
        "and fp weights with the fp cache stay the reference (default fp)",
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison, write JSON (+ Markdown and PNG), print the table."""
    from kvpack.bench.compare import run_compare
    from kvpack.bench.report import markdown, write_report

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict[str, Any]) -> None:
        out.write_text(json.dumps(partial, indent=2) + "\n")

    result = run_compare(args, checkpoint=save)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["contexts"]:
        md_path, png_path = write_report(out)
        print(f"wrote {out}, {md_path}, {png_path}", file=sys.stderr)
    print(markdown(result))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """Streamed perplexity of one cache, with KL and top-1 agreement vs the full-precision cache."""
    from kvpack.bench.compare import run_compare
    from kvpack.bench.report import markdown

    args.caches, args.contexts, args.steps = args.cache, "", 0
    result = run_compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown and PNG from a compare JSON."""
    from kvpack.bench.report import write_report

    md_path, png_path = write_report(Path(args.json))
    print(f"wrote {md_path} and {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpack",
        description="Quantized, packed key/value caches for transformer language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text with a packed cache; print size and speed",
        description="Generate text with a packed KV cache and print a one-line summary: new tokens, tokens/s, "
        "cache bytes and the ratio vs a float16 cache of the same tokens.",
    )
    gen.add_argument("prompt", nargs="?", default="", help="the prompt (appended after --prompt-file, if given)")
    gen.add_argument("--prompt-file", help="a text file to put before the prompt (e.g. a document to ask about)")
    gen.add_argument("--cache", default="k4v4", help="cache spec, e.g. k4v4, k8v8-g64-r128, k2v2-s4 (default k4v4)")
    gen.add_argument("--model", default=None, help="local dir or cached HF model id (default: embedded SmolLM2-135M)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    gen.add_argument(
        "--backend",
        choices=CACHE_BACKENDS,
        default="auto",
        help="attention on the packed cache: auto (the fastest available), cpu (C++ kernel), numba, torch, or dense "
        "(dequantize, then the model's own attention) (default auto)",
    )
    gen.add_argument(
        "--weights", choices=WEIGHT_CHOICES, default="fp", help="quantize the linear weights (optimum-quanto)"
    )
    gen.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    gen.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--check", action="store_true", help="also generate with a full-precision cache and compare")
    gen.set_defaults(func=cmd_generate)

    compare = sub.add_parser(
        "compare",
        help="quality, memory and speed of several caches, side by side",
        description="Stream a text through the model with each cache (PPL, ΔPPL, KL and top-1 vs the "
        "full-precision cache), then measure cache bytes and decode tokens/s at each context, interleaved. "
        "Writes JSON, Markdown and PNG.",
    )
    compare.add_argument("--caches", default=DEFAULT_CACHES, help=f"comma-separated (default {DEFAULT_CACHES})")
    _add_measure_options(compare, tokens=2048)
    compare.add_argument("--contexts", default="1024,4096", help="decode-speed contexts (default 1024,4096)")
    compare.add_argument("--steps", type=int, default=16, help="timed decode steps per cache and context")
    compare.add_argument("--out", default="benchmarks/results/compare.json", help="JSON path (.md/.png beside it)")
    compare.set_defaults(func=cmd_compare)

    ppl = sub.add_parser("ppl", help="streamed perplexity of a cache, with KL and top-1 vs fp")
    ppl.add_argument("--cache", default="k4v4", help="cache: kvpack spec, fp, or a peer like quanto-int4")
    _add_measure_options(ppl, tokens=2048)
    ppl.add_argument("--json", default=None, help="also write the result as JSON")
    ppl.set_defaults(func=cmd_ppl)

    report = sub.add_parser("report", help="Markdown tables and PNG plots from a compare JSON")
    report.add_argument("json", help="a JSON written by `kvpack compare`")
    report.set_defaults(func=cmd_report)

    from kvpack.bench import decode, long_run, memory, threads
    from kvpack.eval import passkey

    memory.add_parser(sub)
    passkey.add_parser(sub)
    bench = decode.add_parser(sub)
    long_run.add_parser(bench)
    threads.add_parser(bench)

    doctor = sub.add_parser("doctor", help="which attention backend this machine gets, and why")
    doctor.set_defaults(func=cmd_doctor)

    spec = sub.add_parser("spec", help="explain a cache spec string (bits, groups, residual, sinks)")
    spec.add_argument("spec", help="e.g. k4v2-g32-r64-s4")
    spec.set_defaults(func=cmd_spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVPackError as exc:
        print(f"kvpack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
