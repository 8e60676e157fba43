"""The Triton kernels of the `triton` attention backend (`kvpack.attention.triton_gpu` runs them).

This module imports triton at the top, so only the backend imports it, at its first use: importing kvpack never
does. Triton decides between compiling and interpreting (`TRITON_INTERPRET=1`) when `@triton.jit` decorates a
function, i.e. when this module is first imported.

Decode attention over one layer's packed cache, flash-decoding style, in two launches:

1. `partials`, grid (splits, batch * kv_heads, row tiles): each program takes a tile of the query rows of one kv
   head (its grouped-query heads times the new tokens: at decode all of them fit one tile, so the cache is read
   once per kv head, not once per query head) and one split of the tokens: a run of packed blocks, or a run of
   exact tokens (sinks, residual and new tokens). It keeps a running max, sum and weighted value sum per row
   (online softmax) over tiles of tokens and writes them as a partial.
2. `merge`, grid (batch * kv_heads, rows): combines the partials of one row by their log-sum-exp and writes the
   output row `[batch, queries, heads, value_dim]` in the query's dtype.

Packed data is dequantized in registers, never written back. For keys, the per-channel scale is folded into the
query and the zero point into a per-row constant: over a block, `q . (c * s + z) = (q * s) . c + q . z`. Values
are dequantized per element (`c * s + z`, the scale and zero of the token's channel group) before the product.
Codes of a codebook read as its level (`level[c] * s + z`: the same identity with `level[c]` for `c`), gathered
from its table of 2**bits floats. Packed data stored rotated (`x @ R`, `kvpack.quant.rotation`) is read as stored:
rotated keys are scored with the rotated query (`q R . k R = q . k`), which the caller computes once, and the
packed splits' value sums stay rotated until the caller turns them back (`acc R.T`) between the two launches.
A single query row (multi-head decode) is computed with elementwise products and sums in float32; more rows use
`tl.dot` on tiles of 16 rows with `tf32x3` precision (three tf32 tensor-core products: float32 accuracy; one
tf32 product would be off by ~1e-3, far outside kvpack's attention tolerance). The interpreter computes `tl.dot`
in plain float32 whatever the precision, so the tests cannot tell these apart: the choice is by design.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvpack.attention.reference import NEG_LARGE

_NEG_LARGE = tl.constexpr(NEG_LARGE)  # running maxima start here: a fully masked row ends as 0 / 0 -> 0


@triton.jit
def _unpack(
    ptr, row_stride, row_valid, n_valid, levels_ptr,
    ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr,
):  # fmt: skip
    """Codes `[ROWS, N]` (float32) of ROWS packed rows of N codes (`packing.py`: a little-endian bit stream per row)
    that start at `ptr`, `row_stride` bytes apart; rows where `row_valid` is False and codes from `n_valid` on
    read as code 0. With LEVELS (a codebook), code c reads as `levels_ptr[c]`, float32 (`kvpack.quant.codebooks`);
    else as c.

    2 and 4 bits: each row's bytes are read once, contiguously, and their fields put in order with `join` (a
    register shuffle). 8 bits: the bytes are the codes. 3 bits: codes straddle bytes, so each code reads the two
    bytes that may hold it (the second only where it straddles).
    """
    rows = tl.arange(0, ROWS)[:, None]
    if BITS == 8:
        index = tl.arange(0, N)[None, :]
        codes = tl.load(ptr + rows * row_stride + index, mask=row_valid[:, None] & (index < n_valid), other=0)
    elif BITS == 3:
        bit = tl.arange(0, N)[None, :] * 3
        shift = bit % 8
        valid = row_valid[:, None] & (bit < n_valid * 3)
        at = ptr + rows * row_stride + bit // 8
        first = tl.load(at, mask=valid, other=0).to(tl.int32)
        second = tl.load(at + 1, mask=valid & (shift > 5), other=0).to(tl.int32)
        codes = ((first | (second << 8)) >> shift) & 7
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = tl.arange(0, N // PER_BYTE)[None, :]
        # (The mask compares the byte index itself, so that Triton sees it constant over runs of bytes and reads
        # them with vector loads.)
        valid = row_valid[:, None] & (byte < n_valid // PER_BYTE)
        packed = tl.load(ptr + rows * row_stride + byte, mask=valid, other=0).to(tl.int32)
        if BITS == 4:
            codes = tl.join(packed & 15, packed >> 4).reshape(ROWS, N)
        else:
            # [row, byte, a, k] holds field 2a + k, i.e. code 4 * byte + 2a + k once flattened.
            low = tl.join(packed & 3, (packed >> 4) & 3)
            high = tl.join((packed >> 2) & 3, packed >> 6)
            codes = tl.join(low, high).reshape(ROWS, N)
    if LEVELS:
        # The table of 2**BITS floats is loaded whole and gathered from in registers: on sm_90 that takes fewer
        # registers than a load per code from global memory (164 against 184 for 4-bit keys and values, one row,
        # head dim 128; 228 against 255 with tensor-core rows). Every code, the masked ones (0) included, is in it.
        table = tl.load(levels_ptr + tl.arange(0, 1 << BITS))
        values = tl.gather(table, codes.reshape(ROWS * N), 0).reshape(ROWS, N)
    else:
        values = codes.to(tl.float32)
    return values


@triton.jit
def _matmul(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """`a [R, K] @ b [K, N]` in float32: tensor cores for tiles of >= 16 rows, elementwise for one row."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _mask_scores(scores, positions, row_query, valid, mask_ptr, mask_strides, causal_last, MASK_KIND: tl.constexpr):
    """Scores `[R, N]` of tokens at `positions` `[N]` for the rows of new token `row_query` `[R]`, masked.

    MASK_KIND 0: no mask; 1: causal among the new tokens (a row sees positions <= causal_last + its new token);
    2: transformers' boolean mask (as uint8, nonzero = attend); 3: an additive float mask. `valid` `[R, N]` marks
    the real (row, token) pairs; the others score -inf.
    """
    at = mask_ptr + row_query[:, None] * mask_strides[0] + positions[None, :] * mask_strides[1]
    if MASK_KIND == 1:
        valid = valid & (positions[None, :] <= causal_last + row_query[:, None])
    elif MASK_KIND == 2:
        valid = valid & (tl.load(at, mask=valid, other=0) != 0)
    elif MASK_KIND == 3:
        scores += tl.load(at, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, scores, float("-inf"))


@triton.jit
def _softmax_step(scores, values, top, total, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step: scores `[R, N]` of N tokens with values `[N, DV]` into the running state."""
    new_top = tl.maximum(top, tl.max(scores, axis=1))
    weights = tl.exp(scores - new_top[:, None])
    correction = tl.exp(top - new_top)
    total = total * correction + tl.sum(weights, axis=1)
    acc = acc * correction[:, None] + _matmul(weights, values, USE_DOT, PRECISION)
    return new_top, total, acc


@triton.jit(
    do_not_specialize=[
        "n_exact", "sink_len", "blocks", "blocks_per_split", "packed_splits", "exact_per_split", "causal_last",
    ]
)  # fmt: skip
def partials(
    q_ptr, q_strides,  # [2, batch, heads, queries, dim]: the query for exact keys, then for keys as packed (below)
    ek_ptr, ek_strides, ev_ptr, ev_strides,  # exact keys / values [batch, kv_heads, n_exact, dim / value_dim]
    kc_ptr, kc_strides,  # key codes uint8 [batch, kv_heads, >= blocks, dim, G * KB / 8]
    kl_ptr,  # the keys' codebook levels float32 [2**KB] (read only with KEY_LEVELS)
    ks_ptr, ks_strides, kz_ptr, kz_strides,  # key scale / zero float16 [batch, kv_heads, >= blocks, dim]
    vc_ptr, vc_strides,  # value codes uint8 [batch, kv_heads, >= blocks * G, value_dim * VB / 8]
    vl_ptr,  # the values' codebook levels float32 [2**VB] (read only with VALUE_LEVELS)
    vs_ptr, vs_strides, vz_ptr, vz_strides,  # value scale / zero float16 [batch, kv_heads, >= tokens, groups]
    mask_ptr, mask_strides,  # mask [batch, queries, tokens] (MASK_KIND 2, 3)
    top_ptr, total_ptr, acc_ptr,  # partials float32 [batch * kv_heads, splits, rows] and [..., rows, value_dim]
    scaling, kv_heads, rep, queries, rows, dim, value_dim, value_group,
    n_exact, sink_len, blocks, blocks_per_split, packed_splits, exact_per_split, causal_last,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr, KEY_LEVELS: tl.constexpr, VALUE_LEVELS: tl.constexpr,
):  # fmt: skip
    """The partial softmax state of one split of the tokens, for one tile of one kv head's query rows.

    Packed data is read as stored: packed keys are scored with the query as they are stored (`q_ptr[1]`: rotated
    for rotated keys; the query itself, by a stride of 0, otherwise), exact keys with the query (`q_ptr[0]`); the
    value sums of packed splits are left in the values' stored basis (the caller turns them back before `merge`,
    which is linear in them).
    """
    USE_DOT: tl.constexpr = BLOCK_R >= 16
    split = tl.program_id(0)
    bh = tl.program_id(1)
    splits = tl.num_programs(0)
    b = (bh // kv_heads).to(tl.int64)  # int64 base offsets: a whole layer may exceed 2**31 elements
    h = (bh % kv_heads).to(tl.int64)

    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = r < rows
    row_query = r % queries  # row r is query head h * rep + r // queries, new token r % queries
    d = tl.arange(0, D_PAD)
    d_valid = d < dim
    c = tl.arange(0, DV_PAD)
    c_valid = c < value_dim
    # A program reads packed blocks or exact tokens, never both (see the loops): one query, chosen here, serves it.
    # (Loading both queries, each for its loop, takes ~40 more registers on the one-row path.)
    q_ptr += (split < packed_splits).to(tl.int64) * q_strides[0] + b * q_strides[1]
    q_at = q_ptr + (h * rep + r // queries)[:, None] * q_strides[2] + row_query[:, None] * q_strides[3]
    q = tl.load(q_at + d[None, :] * q_strides[4], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    q = q.to(tl.float32) * scaling
    mask_ptr += b * mask_strides[0]
    mask_rows = (mask_strides[1], mask_strides[2])

    top = tl.full([BLOCK_R], _NEG_LARGE, tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, DV_PAD], tl.float32)
    # Packed blocks [first_block, last_block): empty for the splits of exact tokens. (The two loops run in turn
    # rather than in the branches of an `if` on the split, whose names Triton would have to reconcile.)
    kc_ptr += b * kc_strides[0] + h * kc_strides[1]
    ks_ptr += b * ks_strides[0] + h * ks_strides[1]
    kz_ptr += b * kz_strides[0] + h * kz_strides[1]
    vc_ptr += b * vc_strides[0] + h * vc_strides[1]
    vs_ptr += b * vs_strides[0] + h * vs_strides[1]
    vz_ptr += b * vz_strides[0] + h * vz_strides[1]
    t = tl.arange(0, BLOCK_T)
    tile_tokens = t < BLOCK_T
    tile_valid = row_valid[:, None] & tile_tokens[None, :]
    group = c // value_group
    TILES: tl.constexpr = G // BLOCK_T  # token tiles per block: smaller tiles keep fewer registers live
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, blocks)
    for tile in range(first_block * TILES, last_block * TILES):
        block = tile // TILES
        k_scale = tl.load(ks_ptr + block * ks_strides[2] + d * ks_strides[3], mask=d_valid, other=0.0)
        k_zero = tl.load(kz_ptr + block * kz_strides[2] + d * kz_strides[3], mask=d_valid, other=0.0)
        k_at = kc_ptr + block * kc_strides[2] + (tile % TILES) * (BLOCK_T * KB // 8)
        k_codes = _unpack(k_at, kc_strides[3], d_valid, BLOCK_T, kl_ptr, D_PAD, BLOCK_T, KB, KEY_LEVELS)  # [D, BT]
        scores = _matmul(q * k_scale.to(tl.float32)[None, :], k_codes, USE_DOT, PRECISION)
        scores += tl.sum(q * k_zero.to(tl.float32)[None, :], axis=1)[:, None]
        token = tile * BLOCK_T + t
        scores = _mask_scores(
            scores, sink_len + token, row_query, tile_valid, mask_ptr, mask_rows, causal_last, MASK_KIND
        )
        v_at = vc_ptr + tile * BLOCK_T * vc_strides[2]
        v_codes = _unpack(
            v_at, vc_strides[2], tile_tokens, value_dim, vl_ptr, BLOCK_T, DV_PAD, VB, VALUE_LEVELS
        )  # [BLOCK_T, DV]
        v_params = token[:, None] * vs_strides[2] + group[None, :] * vs_strides[3]
        v_scale = tl.load(vs_ptr + v_params, mask=c_valid[None, :], other=0.0).to(tl.float32)
        v_params = token[:, None] * vz_strides[2] + group[None, :] * vz_strides[3]
        v_zero = tl.load(vz_ptr + v_params, mask=c_valid[None, :], other=0.0).to(tl.float32)
        top, total, acc = _softmax_step(scores, v_codes * v_scale + v_zero, top, total, acc, USE_DOT, PRECISION)

    # Exact tokens [first_exact, last_exact): empty for the splits of packed blocks.
    ek_ptr += b * ek_strides[0] + h * ek_strides[1]
    ev_ptr += b * ev_strides[0] + h * ev_strides[1]
    first_exact = tl.maximum((split - packed_splits) * exact_per_split, 0)
    last_exact = tl.minimum((split - packed_splits + 1) * exact_per_split, n_exact)
    for start in range(first_exact, last_exact, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        e_valid = e < last_exact
        e_at = ek_ptr + e[None, :] * ek_strides[2] + d[:, None] * ek_strides[3]
        e_keys = tl.load(e_at, mask=d_valid[:, None] & e_valid[None, :], other=0.0).to(tl.float32)  # [D, E]
        e_scores = _matmul(q, e_keys, USE_DOT, PRECISION)
        e_positions = tl.where(e < sink_len, e, e + blocks * G)
        e_scores = _mask_scores(
            e_scores, e_positions, row_query, row_valid[:, None] & e_valid[None, :], mask_ptr, mask_rows,
            causal_last, MASK_KIND,
        )  # fmt: skip
        e_at = ev_ptr + e[:, None] * ev_strides[2] + c[None, :] * ev_strides[3]
        e_values = tl.load(e_at, mask=e_valid[:, None] & c_valid[None, :], other=0.0).to(tl.float32)
        top, total, acc = _softmax_step(e_scores, e_values, top, total, acc, USE_DOT, PRECISION)

    state = ((bh * splits + split) * rows).to(tl.int64) + r
    tl.store(top_ptr + state, top, mask=row_valid)
    tl.store(total_ptr + state, total, mask=row_valid)
    tl.store(acc_ptr + state[:, None] * value_dim + c[None, :], acc, mask=row_valid[:, None] & c_valid[None, :])


@triton.jit(do_not_specialize=["splits"])
def merge(
    top_ptr, total_ptr, acc_ptr,  # partials, as `partials` wrote them
    out_ptr, out_strides,  # output [batch, queries, heads, value_dim]
    kv_heads, rep, queries, rows, splits, value_dim,
    DV_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One output row: the partials of every split merged by their log-sum-exp; 0 where no token was attended."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    c = tl.arange(0, DV_PAD)
    c_valid = c < value_dim
    first = (bh * splits).to(tl.int64) * rows + r  # state of split s: first + s * rows
    best = tl.full([BLOCK_S], _NEG_LARGE, tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        best = tl.maximum(best, tl.load(top_ptr + first + s * rows, mask=s < splits, other=_NEG_LARGE))
    top_all = tl.max(best, axis=0)
    total = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, DV_PAD], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_valid = s < splits
        weight = tl.exp(tl.load(top_ptr + first + s * rows, mask=s_valid, other=_NEG_LARGE) - top_all)
        weight = tl.where(s_valid, weight, 0.0)
        total += weight * tl.load(total_ptr + first + s * rows, mask=s_valid, other=0.0)
        at = acc_ptr + (first + s * rows)[:, None] * value_dim + c[None, :]
        acc += weight[:, None] * tl.load(at, mask=s_valid[:, None] & c_valid[None, :], other=0.0)
    total_all = tl.sum(total, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(total_all > 0, total_all, 1.0)
    b = bh // kv_heads
    head = (bh % kv_heads) * rep + r // queries
    at = out_ptr + b.to(tl.int64) * out_strides[0] + (r % queries) * out_strides[1] + head * out_strides[2]
    tl.store(at + c * out_strides[3], out.to(out_ptr.dtype.element_ty), mask=c_valid)
