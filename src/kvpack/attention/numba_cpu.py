"""The numba CPU backend: attention read straight from packed codes, for machines without a C++ compiler.

Why numba: it installs from a wheel on every platform torch supports (no system C++ compiler), compiles for the
CPU it runs on (AVX-512, AVX2, NEON: no illegal instruction on an older machine), and caches the compiled code
on disk, so only the first use on a machine pays the compile (~10 s, announced on stderr).

The kernel handles the KIVI layout (keys per channel, values per token) at 2, 3, 4 and 8 bits. Work is split
over (batch, kv head, chunk of tokens) items run in parallel; each item keeps a running max, sum and weighted sum
of values per query row (online softmax), and the items of one kv head are merged by their log-sum-exp.

Packed data stored rotated (`QuantSpec.rotation`: stored = x @ R, see `kvpack.quant.rotation`) is read as stored:
packed keys are scored with the query rotated the same way (q·k = (q R)·(k R)), and the packed items' share of the
output, a weighted sum of rotated values, is turned back once per query row in the merge (times R_v.T); the exact
tokens are never rotated. Codes of a codebook (`QuantSpec.codebook`) are read through its level table as they are
unpacked (code c stands for level[c] * scale + zero). Outlier entries (`-o` specs) are not read: `supports` refuses
them.

Inner loops are written so LLVM vectorises them: for widths that divide a byte, codes are unpacked "planar":
sub-code `i` of every byte of a row at once (`(row[j] >> i * bits) & mask` over `j`), so the token (or channel)
of an accumulator slot `[i, j]` is `j * codes_per_byte + i`.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import NEG_LARGE, attention_bias
from kvpack.quant.rotation import rotate, rotation_matrix

# float16 -> float32 without numba's (missing) float16 type:
#     value = (mantissa + 1024 * (exponent > 0)) * _POW2[exponent],  _POW2[e] = 2 ** (max(e, 1) - 25)
# (subnormals included). Exponent 31 (inf/nan) never occurs: quantization refuses values beyond the float16 range.
_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float32)
_MIN_CHUNK_TOKENS = 256
# Stand for "uniform codes" and "values not rotated" (typed like the real tables, so one compiled kernel serves all).
_NO_LEVELS = np.zeros(0, dtype=np.float32)
_NO_ROTATION = np.zeros((0, 0), dtype=np.float32)
# Vectorisable float arithmetic, but no "no NaNs / no infs" assumptions: masked scores are -inf.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}


@njit(inline="always", cache=True)
def _half(bits: Any) -> Any:
    """float16 bit pattern (uint16) -> float32."""
    h = np.int32(bits)
    exponent = (h >> 10) & 0x1F
    value = np.float32((h & 0x3FF) + (1024 if exponent > 0 else 0)) * _POW2[exponent]
    return np.float32(-value if h & 0x8000 else value)


@njit(inline="always", cache=True, fastmath=_FASTMATH)
def _unpack_row(codes: Any, index: Any, bits: int, n: int, levels: Any, out: Any) -> None:
    """Codes of the packed row `codes[index]` into `out[codes_per_byte, bytes]` (planar) or `out[0, n]`.

    levels: float32 `[2**bits]` codebook levels (code c becomes levels[c]), or empty for uniform codes (c itself).
    """
    row = codes[index]
    mask = (1 << bits) - 1
    # One test per row, outside the loops, so the uniform loops stay the plain vectorised int-to-float ones.
    lookup = levels.shape[0] > 0
    if 8 % bits == 0:
        per_byte = 8 // bits
        if lookup:
            for i in range(per_byte):
                shift = i * bits
                for j in range(row.shape[0]):
                    out[i, j] = levels[(row[j] >> shift) & mask]
        else:
            for i in range(per_byte):
                shift = i * bits
                for j in range(row.shape[0]):
                    out[i, j] = np.float32((row[j] >> shift) & mask)
    else:
        last = row.shape[0] - 1
        for t in range(n):
            bit = t * bits
            byte = bit >> 3
            word = np.int32(row[byte])
            if byte < last:
                word |= np.int32(row[byte + 1]) << 8
            code = (word >> (bit & 7)) & mask
            out[0, t] = levels[code] if lookup else np.float32(code)


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _attend(
    q: Any,  # float32 [B, H, R, D]: query rows of each kv head, already multiplied by `scaling`
    q_packed: Any,  # the same for the packed keys: q @ R_k when they are stored rotated, else q itself
    row_query: Any,  # int64 [R]: the new token (mask row) of each query row
    key_codes: Any,  # uint8 [B, H, >= NB, D, group * key_bits / 8]
    key_scale: Any,  # uint16 (float16 bits) [B, H, >= NB, D]
    key_zero: Any,
    value_codes: Any,  # uint8 [B, H, >= P, Dv * value_bits / 8]
    value_scale: Any,  # uint16 (float16 bits) [B, H, >= P, Dv / value_group]
    value_zero: Any,
    key_levels: Any,  # float32 [2**key_bits] codebook levels (code c reads as level[c]), or [0]: uniform codes
    value_levels: Any,  # float32 [2**value_bits], or [0]
    value_rotation: Any,  # float32 [Dv, Dv] R_v when the packed values are stored rotated, else [0, 0]
    blocks: int,  # NB: packed key blocks (P = NB * group packed tokens); the arrays may hold more capacity
    exact_keys: Any,  # float32 [B, H, E, D]
    exact_values: Any,  # float32 [B, H, E, Dv]
    bias: Any,  # float32 [B, Q, total tokens] (additive), or [0, 0, 0] for none
    sink_len: int,
    key_bits: int,
    value_bits: int,
    value_group: int,
    chunk_blocks: int,
    out: Any,  # float32 [B, H, R, Dv]
) -> None:
    batch, heads, rows, dim = q.shape
    group = key_codes.shape[4] * 8 // key_bits
    packed = blocks * group
    value_dim = exact_values.shape[3]
    value_groups = value_dim // value_group
    n_exact = exact_keys.shape[2]
    has_bias = bias.shape[0] > 0
    chunks = (blocks + chunk_blocks - 1) // chunk_blocks
    items = chunks + 1  # the packed chunks, then the exact tokens
    k_per_byte = 8 // key_bits if 8 % key_bits == 0 else 1
    v_per_byte = 8 // value_bits if 8 % value_bits == 0 else 1
    k_slots = key_codes.shape[4] if 8 % key_bits == 0 else group
    v_slots = value_codes.shape[3] if 8 % value_bits == 0 else value_dim
    part_max = np.empty((batch, heads, items, rows), dtype=np.float32)
    part_sum = np.empty((batch, heads, items, rows), dtype=np.float32)
    part_out = np.empty((batch, heads, items, rows, value_dim), dtype=np.float32)

    for work in prange(batch * heads * items):
        b = work // (heads * items)
        h = (work // items) % heads
        item = work % items
        top = np.full(rows, np.float32(NEG_LARGE), dtype=np.float32)
        total = np.zeros(rows, dtype=np.float32)
        result = np.zeros((rows, value_dim), dtype=np.float32)
        if item < chunks:
            acc = np.zeros((rows, v_per_byte, v_slots), dtype=np.float32)
            zero_acc = np.zeros((rows, value_groups), dtype=np.float32)
            codes = np.empty((k_per_byte, k_slots), dtype=np.float32)
            vcodes = np.empty((v_per_byte, v_slots), dtype=np.float32)
            scores = np.empty((rows, k_per_byte, k_slots), dtype=np.float32)
            base = np.empty(rows, dtype=np.float32)
            for block in range(item * chunk_blocks, min((item + 1) * chunk_blocks, blocks)):
                # Scores of the block's tokens: sum over channels of (q * scale) * code, plus q . zero.
                base[:] = 0.0
                scores[:] = 0.0
                for d in range(dim):
                    _unpack_row(key_codes, (b, h, block, d), key_bits, group, key_levels, codes)
                    scale = _half(key_scale[b, h, block, d])
                    zero = _half(key_zero[b, h, block, d])
                    for r in range(rows):
                        qd = q_packed[b, h, r, d]
                        base[r] += qd * zero
                        qs = qd * scale
                        for i in range(k_per_byte):
                            for j in range(k_slots):
                                scores[r, i, j] += qs * codes[i, j]
                for r in range(rows):
                    block_top = top[r]
                    for i in range(k_per_byte):
                        for j in range(k_slots):
                            score = scores[r, i, j] + base[r]
                            if has_bias:
                                score += bias[b, row_query[r], sink_len + block * group + j * k_per_byte + i]
                            scores[r, i, j] = score
                            block_top = max(block_top, score)
                    correction = np.float32(math.exp(top[r] - block_top))
                    total[r] *= correction
                    acc[r] *= correction
                    zero_acc[r] *= correction
                    top[r] = block_top
                    block_sum = np.float32(0.0)
                    for i in range(k_per_byte):
                        for j in range(k_slots):
                            weight = np.float32(math.exp(scores[r, i, j] - block_top))
                            scores[r, i, j] = weight
                            block_sum += weight
                    total[r] += block_sum
                # Weighted sum of the block's values, token by token; the zero points' share goes to zero_acc.
                for i in range(k_per_byte):
                    for j in range(k_slots):
                        token = block * group + j * k_per_byte + i
                        _unpack_row(value_codes, (b, h, token), value_bits, value_dim, value_levels, vcodes)
                        for g in range(value_groups):
                            scale = _half(value_scale[b, h, token, g])
                            zero = _half(value_zero[b, h, token, g])
                            first = g * value_group // v_per_byte
                            last = (g + 1) * value_group // v_per_byte
                            for r in range(rows):
                                weight = scores[r, i, j]
                                ws = weight * scale
                                zero_acc[r, g] += weight * zero
                                for vi in range(v_per_byte):
                                    for vj in range(first, last):
                                        acc[r, vi, vj] += ws * vcodes[vi, vj]
            for r in range(rows):
                for vi in range(v_per_byte):
                    for vj in range(v_slots):
                        d = vj * v_per_byte + vi
                        result[r, d] = acc[r, vi, vj] + zero_acc[r, d // value_group]
        else:
            for e in range(n_exact):
                token = e if e < sink_len else e + packed
                for r in range(rows):
                    score = np.float32(0.0)
                    for d in range(dim):
                        score += q[b, h, r, d] * exact_keys[b, h, e, d]
                    if has_bias:
                        score += bias[b, row_query[r], token]
                    if score > top[r]:
                        correction = np.float32(math.exp(top[r] - score))
                        total[r] *= correction
                        result[r] *= correction
                        top[r] = score
                    weight = np.float32(math.exp(score - top[r]))
                    total[r] += weight
                    for d in range(value_dim):
                        result[r, d] += weight * exact_values[b, h, e, d]
        part_max[b, h, item] = top
        part_sum[b, h, item] = total
        part_out[b, h, item] = result

    rotated = value_rotation.shape[0] > 0
    for bh in prange(batch * heads):
        b = bh // heads
        h = bh % heads
        packed_share = np.zeros(value_dim, dtype=np.float32)
        for r in range(rows):
            top_all = np.float32(NEG_LARGE)
            for item in range(items):
                top_all = max(top_all, part_max[b, h, item, r])
            total_all = np.float32(0.0)
            out[b, h, r] = 0.0
            packed_share[:] = 0.0
            for item in range(items):
                weight = np.float32(math.exp(part_max[b, h, item, r] - top_all))
                total_all += weight * part_sum[b, h, item, r]
                # Rotated packed values: their items' sums are in the rotated basis; gather them to turn back once.
                dst = packed_share if rotated and item < chunks else out[b, h, r]
                for d in range(value_dim):
                    dst[d] += weight * part_out[b, h, item, r, d]
            if rotated:  # out += share @ R_v.T: channel c is the share's dot product with row c of R_v
                for c in range(value_dim):
                    turned = np.float32(0.0)
                    for d in range(value_dim):
                        turned += packed_share[d] * value_rotation[c, d]
                    out[b, h, r, c] += turned
            if total_all > 0:
                out[b, h, r] /= total_all


_compiled = False


def _announce_first_compile() -> None:
    global _compiled
    if not _compiled:
        _compiled = True
        cache_dir = os.environ.get("NUMBA_CACHE_DIR", "numba's cache beside kvpack")
        print(
            f"kvpack: preparing the CPU attention kernel (compiled once per machine, cached in {cache_dir}) ...",
            file=sys.stderr,
            flush=True,
        )


def _storage(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A C-contiguous numpy array (of `dtype`, a same-size reinterpretation) holding `t` at its start along dim 2.

    The cache's packed tensors are views `[:, :, :length]` of preallocated buffers; those views are not
    contiguous, and numba compiles loops over non-contiguous arrays without vectorising them. The kernel takes
    the whole buffer (it reads only the first `blocks` entries along dim 2), or a contiguous copy as a fallback.
    """
    dtype = dtype or t.dtype
    if t.is_contiguous():
        return t.view(dtype).numpy()
    base = t._base
    if (
        base is not None
        and base.is_contiguous()
        and base.dtype == t.dtype
        and base.shape[:2] == t.shape[:2]
        and base.shape[3:] == t.shape[3:]
        and t.storage_offset() == base.storage_offset()
        and t.stride() == base.stride()
    ):
        return base.view(dtype).numpy()
    return t.contiguous().view(dtype).numpy()


def supports(inputs: AttentionInputs) -> str | None:
    """None when the numba kernel handles `inputs`, else why not."""
    if inputs.exact_keys.device.type != "cpu":
        return "the numba kernel runs on CPU tensors only"
    if inputs.packed_keys is None:
        return None
    key, value = inputs.packed_keys.spec, inputs.packed_values.spec if inputs.packed_values is not None else None
    if key.axis != "channel" or value is None or value.axis != "token":
        return "the numba kernel reads the KIVI layout only (keys per channel, values per token)"
    if key.outliers or value.outliers:
        return "the numba kernel does not read outlier entries ('-o' specs; the torch backend does)"
    return None


def numba_attention(
    query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """`reference_attention`, computed by the fused numba kernel. Same shapes and result (within float error).

    Packed keys stored rotated are scored with the query rotated the same way; packed values stored rotated are
    turned back once, in the kernel's merge of its partial results. Codebook codes are read through their levels.
    """
    if not _compiled:
        _announce_first_compile()
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    if torch.get_num_threads() != threads:  # starting numba's threading layer (OpenMP) resets torch's count
        torch.set_num_threads(threads)
    batch, heads, queries, dim = query.shape
    kv_heads = inputs.exact_keys.shape[1]
    rows = heads // kv_heads * queries
    q = (query.float() * scaling).reshape(batch, kv_heads, rows, dim).contiguous()
    row_query = np.arange(rows, dtype=np.int64) % queries
    bias = attention_bias(mask, batch, queries, inputs.total_tokens)
    bias_np = np.zeros((0, 0, 0), np.float32) if bias is None else bias.float().contiguous().numpy()
    value_dim = inputs.exact_values.shape[-1]
    pk, pv = inputs.packed_keys, inputs.packed_values
    q_np = q.numpy()
    q_packed, key_levels, value_levels, value_rotation = q_np, _NO_LEVELS, _NO_LEVELS, _NO_ROTATION
    if pk is None or pv is None:
        key_codes = np.zeros((batch, kv_heads, 0, dim, 1), np.uint8)
        key_params = np.zeros((batch, kv_heads, 0, dim), np.uint16)
        value_codes = np.zeros((batch, kv_heads, 0, 1), np.uint8)
        value_params = np.zeros((batch, kv_heads, 0, 1), np.uint16)
        key_bits, value_bits, value_group = 8, 8, value_dim
        key_scale = key_zero = key_params
        value_scale = value_zero = value_params
    else:
        key_codes, value_codes = _storage(pk.codes), _storage(pv.codes)
        key_scale, key_zero = _storage(pk.scale, torch.uint16), _storage(pk.zero, torch.uint16)
        value_scale, value_zero = _storage(pv.scale, torch.uint16), _storage(pv.zero, torch.uint16)
        key_bits, value_bits, value_group = pk.spec.bits, pv.spec.bits, pv.spec.group_size
        if pk.spec.rotation != "none":
            q_packed = rotate(q, pk.spec.rotation).contiguous().numpy()
        if pv.spec.rotation != "none":
            value_rotation = rotation_matrix(value_dim).numpy()
        if pk.levels is not None:
            key_levels = pk.levels.contiguous().numpy()
        if pv.levels is not None:
            value_levels = pv.levels.contiguous().numpy()
    blocks = pk.codes.shape[2] if pk is not None else 0
    group = pk.spec.group_size if pk is not None else 1
    threads = numba.get_num_threads()
    # Enough items to keep every thread busy (4 per thread), none shorter than _MIN_CHUNK_TOKENS tokens.
    chunks_per_head = max(1, -(-4 * threads // (batch * kv_heads)))
    chunk_blocks = max(-(-blocks // chunks_per_head), -(-_MIN_CHUNK_TOKENS // group), 1)
    out = np.empty((batch, kv_heads, rows, value_dim), dtype=np.float32)
    _attend(
        q_np,
        q_packed,
        row_query,
        key_codes,
        key_scale,
        key_zero,
        value_codes,
        value_scale,
        value_zero,
        key_levels,
        value_levels,
        value_rotation,
        blocks,
        inputs.exact_keys.float().contiguous().numpy(),
        inputs.exact_values.float().contiguous().numpy(),
        bias_np,
        inputs.sink_len,
        key_bits,
        value_bits,
        value_group,
        chunk_blocks,
        out,
    )
    result = torch.from_numpy(out).reshape(batch, heads, queries, value_dim)
    return result.transpose(1, 2).to(query.dtype)
