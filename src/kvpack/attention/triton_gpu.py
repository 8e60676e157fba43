"""The Triton backend: decode attention read straight from the packed cache on CUDA GPUs.

The kernels are in `kvpack.attention.triton_kernels` (how the work is split and what is computed where is
described there); this module decides whether they apply, splits the tokens and launches them, and does in torch
the little that rotated packed data needs around them (the rotated query; turning the values' sums back). It
imports triton only when the backend runs, so importing kvpack never does.

Status: tested against the definition under Triton's interpreter (`TRITON_INTERPRET=1`, which runs the same
kernels on CPU tensors, slowly) and compiled for sm_90 (H100), but not yet run or timed on a GPU:
`benchmarks/triton_attention.py` measures it when one is at hand.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from kvpack.attention.inputs import AttentionInputs
from kvpack.quant.rotation import rotate, unrotate

# Triton's own spellings of true for TRITON_INTERPRET.
_TRUE = ("1", "true", "on", "yes")
# Splits: enough programs to keep every multiprocessor busy with a few each, but at least this many tokens per
# program, so that writing and merging its partial state costs little next to reading its tokens.
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_TOKENS = 256
_MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton would interpret kernels (TRITON_INTERPRET set to a true value) rather than compile them."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def why_unavailable() -> str | None:
    """None when the Triton kernel can run here, else why not (read each call: TRITON_INTERPRET may change)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'kvpack[triton]', Linux)"
    if not interpreting() and not torch.cuda.is_available():
        return (
            "no CUDA GPU here (the triton kernel runs on CUDA tensors; TRITON_INTERPRET=1 interprets it on CPU "
            "tensors, for testing only: it is very slow)"
        )
    return None


def supports(inputs: AttentionInputs) -> str | None:
    """None when the kernel handles `inputs`, else why not."""
    device = inputs.exact_keys.device.type
    if device != "cuda" and not (device == "cpu" and interpreting()):
        return "the triton kernel runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if inputs.exact_keys.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton kernel reads float16, bfloat16 or float32 tensors (got {inputs.exact_keys.dtype})"
    dim, value_dim = inputs.exact_keys.shape[-1], inputs.exact_values.shape[-1]
    if dim % 16 or value_dim % 16 or max(dim, value_dim) > _MAX_HEAD_DIM:
        return f"the triton kernel needs head dims that are multiples of 16 up to 256 (got {dim} and {value_dim})"
    if inputs.packed_keys is None or inputs.packed_values is None:
        return None
    key, value = inputs.packed_keys, inputs.packed_values
    if key.spec.axis != "channel" or value.spec.axis != "token":
        return "the triton kernel reads the KIVI layout only (keys per channel, values per token)"
    if key.spec.outliers or value.spec.outliers:
        return "the triton kernel does not read outlier entries ('-o' specs; the torch backend does)"
    group = key.spec.group_size
    if group % 16 or group & (group - 1):
        return f"the triton kernel needs a key group size that is a power of two from 16 (got {group})"
    if key.codes.stride(-1) != 1 or value.codes.stride(-1) != 1:
        return "the triton kernel reads packed rows whose bytes are contiguous"
    return None


@cache
def _kernels() -> ModuleType:
    from kvpack.attention import triton_kernels  # imports triton: only once the backend runs

    return triton_kernels


@cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: a few programs are enough to exercise the splits
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@cache
def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty uint8 and float16 tensors that stand for absent inputs (nothing packed yet, no mask): never read."""
    return torch.empty(0, dtype=torch.uint8, device=device), torch.empty(0, dtype=torch.float16, device=device)


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(rows: int, dim: int) -> tuple[int, int, int]:
    """(query rows, tokens) per tile and warps per program.

    One row (multi-head decode) takes the elementwise path; more rows are padded to a tensor-core tile of 16, and
    a kv head with more than 16 rows is split over programs that each read its cache. Chosen from sm_90 builds
    (ptxas -v, `python -m tests.helpers.triton_compile`): these stay within 255 registers without spilling,
    except head dims of 256 with several rows (~100 bytes spilled); tiles of 64 tokens, or of 32 or 64 rows,
    spilled.
    """
    if rows == 1:
        return 1, 32, 4 if dim <= 128 else 8
    return 16, 32 if dim <= 128 else 16, 8


def default_split_blocks(blocks: int, group_size: int, programs_per_split: int, device: torch.device) -> int:
    """Packed blocks per program: the tokens of each (batch, kv head, row tile) split over enough programs to
    fill the GPU (`_PROGRAMS_PER_SM` per multiprocessor), each with at least `_MIN_SPLIT_TOKENS` tokens."""
    splits = max(1, _cdiv(_PROGRAMS_PER_SM * _multiprocessors(device), programs_per_split))
    return max(_cdiv(blocks, splits), _cdiv(_MIN_SPLIT_TOKENS, group_size), 1)


def triton_attention(
    query: torch.Tensor,
    inputs: AttentionInputs,
    mask: torch.Tensor | None,
    scaling: float,
    *,
    split_blocks: int | None = None,
) -> torch.Tensor:
    """`reference_attention`, computed by the Triton kernels. Same shapes and result (within float error).

    Packed keys stored rotated (`QuantSpec.rotation`) are scored with the query rotated the same way, computed here
    once per call; the value sums of the packed splits, in the basis of packed values stored rotated, are turned
    back here between the two launches. Both are float32 matmuls in torch, so they follow torch's float32 matmul
    precision as the torch backend does (float32 unless TF32 was allowed). Codes of a codebook
    (`QuantSpec.codebook`) are read through its level table.
    split_blocks: packed blocks per program (default: `default_split_blocks`); tests set it to exercise the merge.
    """
    kernels = _kernels()
    batch, heads, queries, dim = query.shape
    kv_heads = inputs.exact_keys.shape[1]
    rep = heads // kv_heads
    rows = rep * queries  # one kv head's query rows: its grouped-query heads times the new tokens
    value_dim = inputs.exact_values.shape[-1]
    n_exact = inputs.exact_keys.shape[2]
    tokens = inputs.total_tokens
    device = query.device
    out = torch.empty(batch, queries, heads, value_dim, dtype=query.dtype, device=device)
    no_bytes, no_halves = _placeholders(device)

    pk, pv = inputs.packed_keys, inputs.packed_values
    query_pair = query[None].expand(2, *query.shape)  # [for exact keys, for packed keys]: the same by default
    key_levels = value_levels = None  # codebooks' level tables
    if pk is not None and pv is not None:
        blocks, group = pk.codes.shape[2], pk.spec.group_size
        key_bits, value_bits, value_group = pk.spec.bits, pv.spec.bits, pv.spec.group_size
        key_levels, value_levels = pk.levels, pv.levels
        key_args = (
            pk.codes, pk.codes.stride(), no_halves if key_levels is None else key_levels,
            pk.scale, pk.scale.stride(), pk.zero, pk.zero.stride(),
        )  # fmt: skip
        value_args = (
            pv.codes, pv.codes.stride(), no_halves if value_levels is None else value_levels,
            pv.scale, pv.scale.stride(), pv.zero, pv.zero.stride(),
        )  # fmt: skip
        if pk.spec.rotation != "none":  # packed keys stored rotated are scored with the query rotated the same way
            query_pair = torch.stack([query.float(), rotate(query, pk.spec.rotation)])
    else:  # nothing packed yet: the packed loop never runs, these only fill the signature
        blocks, group, key_bits, value_bits, value_group = 0, 16, 8, 8, 16
        key_args = (no_bytes, (0,) * 5, no_halves, no_halves, (0,) * 4, no_halves, (0,) * 4)
        value_args = (no_bytes, (0,) * 4, no_halves, no_halves, (0,) * 4, no_halves, (0,) * 4)

    mask_args: tuple[torch.Tensor, tuple[int, ...]] = (no_bytes, (0, 0, 0))
    mask_kind = 0 if queries == 1 else 1  # 1: causal among the new tokens
    if mask is not None:
        view = mask.expand(batch, mask.shape[1], queries, mask.shape[-1])[:, 0, :, -tokens:]
        if view.dtype == torch.bool:
            mask_kind, view = 2, view.view(torch.uint8)
        else:
            mask_kind = 3
        mask_args = (view, view.stride())

    tile_rows, tile_tokens, warps = _tiles(rows, max(dim, value_dim))
    row_tiles = _cdiv(rows, tile_rows)
    if split_blocks is None:
        split_blocks = default_split_blocks(blocks, group, batch * kv_heads * row_tiles, device)
    packed_splits = _cdiv(blocks, split_blocks)
    exact_per_split = tile_tokens * _cdiv(split_blocks * group, tile_tokens)
    splits = packed_splits + _cdiv(n_exact, exact_per_split)
    if splits == 0:
        return out.zero_()
    top = torch.empty(batch * kv_heads, splits, rows, dtype=torch.float32, device=device)
    total = torch.empty_like(top)
    acc = torch.empty(batch * kv_heads, splits, rows, value_dim, dtype=torch.float32, device=device)
    # tf32x3: float32 accuracy from tensor cores; ROCm's Triton has no tf32, and plain float32 there is exact.
    precision = "ieee" if torch.version.hip else "tf32x3"
    ek, ev = inputs.exact_keys, inputs.exact_values
    kernels.partials[(splits, batch * kv_heads, row_tiles)](
        query_pair, query_pair.stride(), ek, ek.stride(), ev, ev.stride(), *key_args, *value_args, *mask_args,
        top, total, acc,
        scaling, kv_heads, rep, queries, rows, dim, value_dim, value_group,
        n_exact, inputs.sink_len, blocks, split_blocks, packed_splits, exact_per_split, tokens - queries,
        D_PAD=_power_of_two(dim), DV_PAD=_power_of_two(value_dim), G=group, KB=key_bits, VB=value_bits,
        BLOCK_R=tile_rows, BLOCK_T=min(tile_tokens, group), BLOCK_E=tile_tokens, MASK_KIND=mask_kind,
        PRECISION=precision, KEY_LEVELS=key_levels is not None, VALUE_LEVELS=value_levels is not None,
        num_warps=warps,
    )  # fmt: skip
    if pv is not None and pv.spec.rotation != "none" and packed_splits:
        # The packed splits' value sums are sums of stored values, x @ R: the merge is linear in them, so turning
        # them back here, once per split rather than once per token, gives the merge plain sums.
        acc[:, :packed_splits] = unrotate(acc[:, :packed_splits], pv.spec.rotation)
    kernels.merge[(batch * kv_heads, rows)](
        top, total, acc, out, out.stride(), kv_heads, rep, queries, rows, splits, value_dim,
        DV_PAD=_power_of_two(value_dim), BLOCK_S=16,
    )  # fmt: skip
    return out
