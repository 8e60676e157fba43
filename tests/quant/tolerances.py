"""The one table of numeric tolerances for kvpack's quantization tests, with the reason for each number.

Packing is tested bit-exact and needs no tolerance. Quantization has two kinds of bound:

1. Per element (deterministic, derived): `|x - x_hat| <= scale / 2` plus a float32 rounding slack, see
   `max_abs_error`; and how tightly the float16 scale fits the group's range, see `SCALE_RELATIVE_SLACK`.
2. Aggregate (statistical, measured): SQNR on Gaussian data, see `SQNR_MIN_DB`.
"""

from __future__ import annotations

import torch

# torch.finfo(torch.float32).eps = 2**-23: twice the unit roundoff u = 2**-24 of one float32 operation.
F32_EPS = 2.0**-23

# How far a float16 scale may sit from the exact (max - zero) / qmax before its own rounding up to float16:
# the reference computes that ratio in float32, a subtraction and a division, two roundings of relative
# error <= u each, so <= 2u. Allowed: 4u = 2 * F32_EPS, a factor 2 of headroom.
SCALE_RELATIVE_SLACK = 2 * F32_EPS


def max_abs_error(scale: torch.Tensor, x_hat: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest |x - x_hat| allowed for an element whose group has float16 `scale`, in float64.

    Why `scale / 2`: codes are chosen by round-to-nearest from a float16 zero rounded down and a float16
    scale rounded up, so the exact reconstruction error is at most half a step and no code is clamped.

    Why the slack, and why it is only float32 rounding: the reference computes in float32.
      - q = (x - zero) / scale takes two float32 roundings, each relative error <= u, so q (which is at most
        about qmax) is off by <= 2u * q <= (qmax + 1) * eps32 codes; that can move a tie to the other code,
        costing at most (qmax + 1) * eps32 steps beyond half a step.
      - c * scale is exact (<= 8-bit integer times an 11-bit significand fits in 24 bits); adding zero
        rounds once: <= u * |x_hat| <= eps32 * |x_hat| (eps32 = 2u: a factor 2 of headroom, no more).
    Both terms are ~1e-7 relative, i.e. thousands of times smaller than half a step for 8-bit codes.
    """
    qmax = (1 << bits) - 1
    scale64 = scale.double()
    return scale64 * (0.5 + (qmax + 1) * F32_EPS) + F32_EPS * x_hat.double().abs()


# Minimum SQNR (dB) of PackedTensor.quantize -> dequantize on standard Gaussian data, keyed by
# (bits, group_size). Measured on CPU, torch 2.13, tensors [2, 4, 256, 128] from seeds 0..4, both axes,
# inputs float32/float16/bfloat16 (SQNR against the dtype-rounded input); the measured minimum over those
# 30 runs is in the comment, spread across seeds <= 0.08 dB. Each threshold is the measured minimum rounded
# down to 0.1 dB, less 0.2 dB: a margin of ~3x the seed spread, far smaller than one bit (~6 dB).
#
# Why these values: a uniform quantizer whose step is range / (2**bits - 1) has noise step**2 / 12, so
#   SQNR ~= 20 log10(2**bits - 1) + 10 log10(12) - 20 log10(E[range of g normals])
# with E[range] = 3.53, 4.14, 4.69, 5.19 sigma for g = 16, 32, 64, 128: the "~6.02 dB per bit" rule, less
# ~1 dB per doubling of the group (wider expected range). That model is in the second comment column;
# the measurements agree with it to 0.35 dB: each group's minimum (and nearly its maximum) is reconstructed
# almost exactly, removing ~2/g of the noise (+0.3 dB at g = 16), while float16's rounded-up scale and
# rounded-down zero widen the step a little.
SQNR_MIN_DB: dict[tuple[int, int], float] = {
    # (bits, group): threshold   measured min | model
    (2, 16): 9.4,  # 9.68 | 9.37
    (2, 32): 7.8,  # 8.08 | 8.00
    (2, 64): 6.7,  # 6.90 | 6.92
    (2, 128): 5.7,  # 5.97 | 6.04
    (3, 16): 16.8,  # 17.07 | 16.73
    (3, 32): 15.2,  # 15.47 | 15.36
    (3, 64): 14.0,  # 14.29 | 14.27
    (3, 128): 13.1,  # 13.36 | 13.40
    (4, 16): 23.4,  # 23.69 | 23.35
    (4, 32): 21.8,  # 22.09 | 21.98
    (4, 64): 20.7,  # 20.92 | 20.89
    (4, 128): 19.7,  # 19.98 | 20.01
    (8, 16): 48.0,  # 48.28 | 47.96
    (8, 32): 46.4,  # 46.68 | 46.59
    (8, 64): 45.3,  # 45.51 | 45.50
    (8, 128): 44.3,  # 44.59 | 44.62
}


# Attention backends vs the reference, on the same packed data (so quantization error is not in the comparison,
# only float32 arithmetic in another order): outputs are convex combinations of value rows, so errors are
# relative to max |value|. Rounding error of sums over n terms grows like sqrt(n) * u in practice (n * u = 2.4e-4
# at 4096 tokens is the worst case, never approached by random data); measured here: <= 2e-6 relative up to 4096
# tokens. Allowed: 2e-5, ten times that.
ATTENTION_REL_TOL = 2e-5

# A float16 or bfloat16 model's attention output against the float64 definition: the backends compute in float32
# and round the output once to the model dtype (relative error <= eps / 2), which dominates float32's error. Allowed:
# 4 eps of that dtype, relative to max |value| as above.
HALF_OUTPUT_EPS = 4


# -- tiny models in generation (tests/cache, tests/attention/test_fused_cache.py) ----------------------------------
#
# Largest |logit difference| allowed between an 8-bit, group-16 cache and DynamicCache on the tiny random-weight
# models of `tests.helpers.models`. Why this number: an 8-bit code is within half a step, range / 510, of its input,
# i.e. ~0.2% of a group's range; through two layers this moves logits (which span ~0.8 here) by at most 3.5e-3 in
# every measured run (teacher-forced, 100 tokens, batch 2: residual 16 <= 0.9e-3, residual 0 <= 3.5e-3; CPU, torch
# 2.13). 5e-3 keeps 1.4x headroom over that worst case, and is still 14x below what a 2-bit cache does to the same
# logits (>= 7e-2), which `test_logit_tolerance_separates_8_bit_from_2_bit` checks so that the tolerance stays
# meaningful.
LOGIT_TOL_8BIT = 5e-3

# The fused path (kvpack's attention reading the packed cache) against the dense path (the model's SDPA reading the
# same cache dequantized): the same stored data and semantics, so only float32 arithmetic order differs. Logits of
# the tiny models span ~1; reordering sums over <= 100 tokens moves them by ~1e-6 (measured <= 2e-6). 1e-4 leaves
# room and is still 30x below an 8-bit cache's own effect (>= 3e-3).
FUSED_LOGIT_TOL = 1e-4


# -- whole models (tests/test_architectures.py) -------------------------------------------------------------------
#
# Tiny random-weight models of every supported architecture, greedy decoding of a fixed 40-token prompt, spec
# k8v8-g16-r16 / k4v4-g16-r16 (so the prompt's older tokens are packed). Their logits span ~1.1 and are nearly flat,
# so a top-2 margin can be smaller than any cache's error: greedy outputs are compared with
# `tests.helpers.generation.assert_same_greedy` (equal tokens, logits within the tolerance, a divergence allowed only
# at a step whose full-precision top-2 margin is within twice the tolerance).
#
# Largest |logit difference| between the 8-bit cache and DynamicCache, by model dtype.
#   float32, float16: 5e-3, the bound of the tiny models in generation (LOGIT_TOL_8BIT, reasoned above); measured here
#       <= 8.4e-4 (float32) and <= 1.0e-3 (float16, whose logits near 1 are rounded to 2**-10 steps) over the 7
#       architectures and 4 attention paths (CPU, torch 2.13).
#   bfloat16: 2**-7 = 7.8e-3, one bfloat16 ulp of a logit in [1, 2). In bfloat16 the model's own rounding (8 bits of
#       significand, 2**-9 relative) is as coarse as an 8-bit code of a group (range / 510), so the two caches differ
#       by flipped roundings of the logits themselves: measured 3.9e-3 everywhere, one ulp of a logit in [0.5, 1).
#       One ulp at the top of the logits' range is allowed, no more.
LOGIT_TOL_8BIT_BY_DTYPE: dict[torch.dtype, float] = {
    torch.float32: LOGIT_TOL_8BIT,
    torch.float16: LOGIT_TOL_8BIT,
    torch.bfloat16: 2.0**-7,
}

# The 4-bit cache, teacher-forced along the full-precision greedy path (each step's logits with the 4-bit cache holding
# the full-precision prefix, so one flip does not derail the rest), 16 steps:
#   - logits within 5e-2 of full precision at every step. A 4-bit code's step is 17x an 8-bit one's (range / 15 vs
#     range / 255), so ~17x the 8-bit error (<= 1e-3 here): measured <= 2.9e-2 (Qwen2, whose key biases widen the
#     key groups; <= 1e-2 on the others), in every dtype and path. 5e-2 keeps 1.7x headroom;
#   - the greedy choice differs only at a near-tie (full-precision top-2 margin within twice that), and on at least
#     12 of 16 steps. Measured: 16 of 16 on Llama, Qwen2, Qwen3, Mistral, Phi-3 and Gemma 3 in every dtype and path;
#     GPT-NeoX, whose random logits have top-2 margins down to 2e-4, 14 / 15 / 13 of 16 in float32 / float16 /
#     bfloat16, each flip at a margin <= 3e-3. A cache that was wrong rather than noisy (a misplaced group) would
#     agree on ~1/vocab of the steps.
LOGIT_TOL_4BIT_BY_DTYPE: dict[torch.dtype, float] = {torch.float32: 5e-2, torch.float16: 5e-2, torch.bfloat16: 5e-2}
K4V4_MIN_TOP1_AGREEMENT = 12 / 16

# Gemma 3 270M (real weights, float32, kvpack's fused path), the same 16 teacher-forced steps after a 40-token prompt:
# the 8-bit cache reproduces the greedy output exactly (dense and fused); the 4-bit one (fused path) measured 15 of
# 16 (one flip, where the full-precision top-2 logits are close). Allowed: 14 of 16.
GEMMA3_270M_K4V4_MIN_TOP1_AGREEMENT = 14 / 16


def codebook_max_abs_error(levels: torch.Tensor, scale: torch.Tensor, x_hat: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest |x - x_hat| allowed with a codebook (`level[c] * scale + zero`, no clipping), in float64.

    Why `half_gap * scale`: every element lies in its group's range [zero, zero + qmax * scale] and gets its nearest
    level, so it is at most half the widest gap between neighbouring levels away, or as far as the range's ends are
    from the outer levels (`levels[0]` and `qmax - levels[-1]`).
    Slack, float32 rounding only: the position (x - zero) / scale as in `max_abs_error`, (qmax + 1) * eps32 steps;
    the midpoints between levels (one rounding of numbers <= qmax: <= qmax * u steps); level * scale (no longer exact,
    the levels are not integers: <= u * qmax * scale); adding zero (eps32 * |x_hat|). 2 * (qmax + 1) * eps32 steps
    covers the first three.
    """
    qmax = (1 << bits) - 1
    lv = levels.double()
    half_gap = max(float(lv[0]), qmax - float(lv[-1]), float((lv[1:] - lv[:-1]).max()) / 2)
    scale64 = scale.double()
    return scale64 * (half_gap + 2 * (qmax + 1) * F32_EPS) + F32_EPS * x_hat.double().abs()


# -- the default spec across model families (tests/test_default_spec.py) -------------------------------------------

# A tiny random Qwen2 with large key-projection biases (`kvpack.bench.synthetic.biased_key_model`), 5 seeds, 384
# calibration-text tokens streamed: mean KL of a cache divided by that of KIVI + 4 sinks (`k4v4-plain-s4`), averaged
# over the seeds. Measured (CPU, torch 2.13): the default `k4v4` (values rotated, keys not) 0.996 (0.955-1.028 per
# seed: value rotation on random values is noise); keys rotated too (`k4v4-rotk`, the default before 2026-12-05)
# 1.165 (1.058-1.278). The default may not exceed 1.03 (the per-seed noise); the rotated keys must stay above 1.10,
# so that the stand-in keeps showing the failure the default avoids.
DEFAULT_VS_KIVI_SINKS_MAX_RATIO = 1.03
ROTATED_KEYS_VS_KIVI_SINKS_MIN_RATIO = 1.10


# -- the CPU kernel's integer products (AVX-512 VNNI; tests/attention/test_integer_products.py) --------------------
#
# With `integer_products`, the kernel multiplies 2- and 4-bit codes as integers (exact int32 sums). Per packed block and
# query row it rounds qs = q * key_scale (per channel) to two int8 digits, qs ~ alpha * (high + low / 254) with alpha =
# max|qs| / 127, and the weights times the value scales, p = w * value_scale, to two uint8 digits, p ~ beta * (high +
# low / 254) with beta = max p / 255; it puts back each rounding's share at the middle code cm = (2**bits - 1) / 2.
#
# Keys: the query's rounding is deterministic (the same float32 operations), so the test computes it as the kernel
# does and scores with it in float64: score_t = definition_t - sum_d e_d (code_dt - cm), e = qs - alpha * (high +
# low / 254). A rotated query is computed in another order (the kernel's sums vs torch's matmul, ~1e-6 relative), so
# its digits may differ at a tie: what they stand for then differs by at most alpha / 254 per channel (plus the
# ~1e-6), moving a score by d <= alpha * (1 / 254 + INTEGER_QUERY_SLACK) * sum_d |code - cm|; the weights move by a
# factor within exp(+-2 max d), the output by at most (exp(2 max d) - 1) * max |v|.
# Values: each p_t is off by at most beta / (2 * 254), so block b adds at most that times max_c sum_t |code_tc - cm| to
# the weighted sum, relative to the total weight: max_t (P_t * s_t) / (255 * 508) * ..., with P the probabilities (of
# the scores above) and s the tokens' value scales. A worst case (every rounding the same sign).
# On top: ATTENTION_REL_TOL for float32 arithmetic, INTEGER_STEP_SLACK for beta computed in float32.
# For scale (measured 2026-12-06 on random data in the default model's shapes, k4v4 and k2v2, 1k-8k tokens): the
# integer products' error (rmse) is 3e-5 to 9e-5 of the output's, the 4-bit codes' own 11-22%; with one digit instead
# of two it was 0.5-1.6% (and +11% KL on the default model), which is why there are two.
INTEGER_LOW_DIGITS = 254
INTEGER_QUERY_SLACK = 1e-5
INTEGER_STEP_SLACK = 1.001


def integer_products_bound(
    tie_shift: torch.Tensor,
    probabilities: torch.Tensor,
    value_codes: torch.Tensor,
    value_scales: torch.Tensor,
    value_middle: float,
    value_scale: float,
) -> float:
    """The largest |error| allowed between the kernel's integer products and the float64 attention over the scores
    the query's rounding gives (see above).

    tie_shift: [B, H, R] the most a row's scores may move by digits that differ at a tie (0 without rotation).
    probabilities: [B, H, R, NB, G] the softmax weights of the packed tokens (those scores).
    value_codes, value_scales: [B, H, NB, G, Dv] each packed value's code and its group's scale.
    value_scale: max |value| of the layer (the output's scale).
    """
    growth = torch.exp(2 * tie_shift)
    per_token = (probabilities[..., None] * value_scales[:, :, None]).amax(-1)  # [B, H, R, NB, G]
    beta = per_token.amax(-1) / 255 * INTEGER_STEP_SLACK  # [B, H, R, NB]
    spread = (value_codes - value_middle).abs().sum(3).amax(-1)  # [B, H, NB]
    value_error = (beta / (2 * INTEGER_LOW_DIGITS) * spread[:, :, None]).sum(-1)  # [B, H, R]
    bound = (growth - 1) * value_scale + growth * value_error
    return float(bound.max()) + ATTENTION_REL_TOL * value_scale


# The same in a model: a tiny random Llama (head dims 32 and 64, k4v4 groups of 32, with and without rotation and
# sinks), fused decode steps with the integer products against the dense path over the same cache. Measured (CPU,
# torch 2.13): the integer products move logits by 8e-7 to 1.2e-6 (the float kernel by 2e-7 to 3e-7), the 4-bit codes
# themselves (dense path vs DynamicCache) by 1.3e-2 to 1.4e-2: below 1e-4 of it. Allowed: a thousandth of the codes'
# own effect (one 8-bit digit instead of two measured 1/40 to 1/60, which this would catch).
INTEGER_LOGIT_SHARE = 1e-3
