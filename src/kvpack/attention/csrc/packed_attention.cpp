// kvpack's fused CPU attention over a packed KV cache (KIVI layout), built at first use with torch's extension
// tooling and -march=native (see kvpack/attention/cpu.py).
//
// Inputs (one layer; B batch, Hq query heads, H kv heads, Q new tokens, R query rows per kv head = Hq / H x Q):
//   query        float32 [B, Hq, Q, D], any strides; the kernel scales it (and rotates it for rotated keys)
//   key_codes    uint8 [B, H, >=NB, D, G*KB/8]: per channel, G consecutive tokens per row
//   key_scale/zero  float16 [B, H, >=NB, D]
//   value_codes  uint8 [B, H, >=P, Dv*VB/8]: per token, one row of Dv codes
//   value_scale/zero float16 [B, H, >=P, Dv/VG]
//   packed_tokens P = NB * G (the tensors may have more capacity along dim 2: the cache's own buffers)
//   exact_keys/values float32 [B, H, >=E, D / Dv]: sinks (the first sink_len), then residual and new tokens;
//                the first exact_tokens E are read
//   bias         float32 [B, Q, total tokens] additive, or None
//   key_rotation, value_rotation  float32 [D, D] / [Dv, Dv] R when the packed keys / values are stored rotated
//                (keys are scored with q @ R_k; the values' share of the output is turned back with R_v^T when the
//                items are merged), or None
//   key_levels, value_levels  float32 [2**bits] codebook levels (code c stands for level[c] * scale + zero; bits
//                <= 4), or None for uniform codes (level[c] = c)
//   integer_products  allow the integer products where this build has them (see integer_product)
// Output: float32 [B, Q, Hq, Dv].
//
// Every (batch, kv head) is split into chunks of packed blocks plus one item for the exact tokens; items run in
// parallel (torch's thread pool), each keeping a running max / sum / weighted value sum per row (online softmax);
// the items of one head are merged by their log-sum-exp. Within a block, codes are unpacked in registers and
// multiplied with register-blocked loops of 16 lanes (AVX-512 intrinsics; AVX2 intrinsics, 8 lanes at a time, where
// the CPU has AVX2 and FMA but not AVX-512; loops the compiler vectorises elsewhere: NEON), or, with
// `integer_products` on a CPU with AVX-512 VNNI, multiplied as integers (see integer_product). AVX-512 builds
// prefetch the codes of the next block while one is computed.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define KVPACK_AVX2 1  // AVX2 intrinsics (8 lanes) where the CPU has AVX2 and FMA but not AVX-512
#endif

#if defined(__AVX512F__) || defined(__F16C__) || defined(KVPACK_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

namespace {

constexpr float kNegLarge = -1.0e30f;  // running maxima start here: a fully masked row ends as 0 / 0 -> 0
constexpr int kLanes = 16;             // the width of the register tiles
constexpr int kExactTile = 64;         // exact tokens scored per tile
constexpr int kItemsPerThread = 4;     // work items per thread (see packed_attention)
constexpr int kMinChunkTokens = 256;   // packed tokens per work item, at least
constexpr int kPrefetchBlocks = 1;     // packed blocks ahead whose codes are prefetched (1, 2, 4 measured: 1)

// exp_nonpositive's constants, shared with its vector versions below: log2(e), ln 2 as a part exact in float minus
// a correction, and the polynomial's coefficients (p = ((c0 r + c1) r + ...) r + c5, then exp(r) ~ p r^2 + r + 1).
constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Correction = 2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * p(r), |relative error| < 2e-7.
// Below -87 (or -inf: a masked score) it is exactly 0.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::floor(clamped * kLog2e + 0.5f);
  const float r = clamped - n * kLn2High + n * kLn2Correction;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// float16 bits -> float32, branch-free so that loops over it vectorise (no inf/nan: quantization refuses them).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  const uint32_t normal_bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  float normal;
  std::memcpy(&normal, &normal_bits, sizeof(normal));
  const float subnormal = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // 2^-24
  return exponent == 0 ? (sign ? -subnormal : subnormal) : normal;
}

inline void halves_to_floats(const at::Half* src, int n, float* __restrict out) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + i))));
#endif
  for (; i < n; ++i) out[i] = half_to_float(bits[i]);
}

#if defined(KVPACK_AVX2)
// The sum and the max of 8 lanes.
inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

// Codes per byte of a width; 3-bit codes straddle bytes and are unpacked in order instead.
constexpr int per_byte(int bits) { return 8 % bits == 0 ? 8 / bits : 1; }

// The codes of `rows` packed rows of `n` codes each, as floats in "planar" order: within a row, sub-code i of
// every byte first (slot i * n / per_byte + j holds code j * per_byte + i), which needs no shuffles. 3-bit rows
// are unpacked in order. With LUT, code c becomes lut[c] (a codebook's level) instead of c.
template <int BITS, bool LUT>
inline void unpack_planar(const uint8_t* __restrict codes, int rows, int n, float* __restrict out,
                          const float* __restrict lut) {
  constexpr int kPer = per_byte(BITS);
  constexpr uint8_t kMask = (1 << BITS) - 1;
  if constexpr (BITS == 3) {
    for (int row = 0; row < rows; ++row)
      for (int j = 0; j < n / 8; ++j) {
        const uint8_t* b = codes + (row * n + 8 * j) * 3 / 8;
        const uint32_t w = b[0] | (b[1] << 8) | (b[2] << 16);
        for (int i = 0; i < 8; ++i) {
          const uint32_t code = (w >> (3 * i)) & 7;
          out[row * n + 8 * j + i] = LUT ? lut[code] : static_cast<float>(code);
        }
      }
  } else {
    const int bytes = n / kPer;
    for (int row = 0; row < rows; ++row) {
      const uint8_t* src = codes + row * bytes;
      float* dst = out + row * n;
      for (int i = 0; i < kPer; ++i) {
        if constexpr (LUT) {
          for (int j = 0; j < bytes; ++j) dst[i * bytes + j] = lut[(src[j] >> (i * BITS)) & kMask];
        } else {
#pragma omp simd
          for (int j = 0; j < bytes; ++j) dst[i * bytes + j] = static_cast<float>((src[j] >> (i * BITS)) & kMask);
        }
      }
    }
  }
}

// The code index (token of a key row, channel of a value row) held by planar slot `slot` of a row of n codes.
inline int planar_to_index(int slot, int n, int per) { return (slot % (n / per)) * per + slot / (n / per); }

// out[r][n] (+)= sum_k a[r][k] * b[k][n] for RT rows and NT tiles of 16 columns at once (RT * NT independent
// accumulators, so the multiply-adds are not serialised on their latency): a [RT][K] (stride lda), b [K][N]
// (stride ldb), N a multiple of 16.
template <int RT, int NT>
inline void small_gemm(const float* __restrict a, int lda, const float* __restrict b, int64_t ldb, int K, int n0,
                       float* __restrict out, int ldo, bool accumulate) {
  float acc[RT][NT][kLanes];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < NT; ++t)
      for (int l = 0; l < kLanes; ++l) acc[r][t][l] = accumulate ? out[r * ldo + n0 + t * kLanes + l] : 0.0f;
  for (int k = 0; k < K; ++k) {
    const float* __restrict bk = b + k * ldb + n0;
    for (int r = 0; r < RT; ++r) {
      const float ak = a[r * lda + k];
      for (int t = 0; t < NT; ++t)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[r][t][l] += ak * bk[t * kLanes + l];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < NT; ++t)
      for (int l = 0; l < kLanes; ++l) out[r * ldo + n0 + t * kLanes + l] = acc[r][t][l];
}

template <int RT>
void gemm_tiles(const float* a, int lda, const float* b, int64_t ldb, int K, int N, float* out, int ldo,
                bool accumulate) {
  int n0 = 0;
  for (; n0 + 4 * kLanes <= N; n0 += 4 * kLanes) small_gemm<RT, 4>(a, lda, b, ldb, K, n0, out, ldo, accumulate);
  for (; n0 < N; n0 += kLanes) small_gemm<RT, 1>(a, lda, b, ldb, K, n0, out, ldo, accumulate);
}

void gemm_rows(const float* a, int lda, const float* b, int64_t ldb, int R, int K, int N, float* out, int ldo,
               bool accumulate) {
  for (int r = 0; r < R; r += 4) {
    switch (std::min(4, R - r)) {
      case 4: gemm_tiles<4>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate); break;
      case 3: gemm_tiles<3>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate); break;
      case 2: gemm_tiles<2>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate); break;
      default: gemm_tiles<1>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate);
    }
  }
}

// The same product with b's rows packed: row k of b is the codes of packed row `rows[k]` (or k) in planar slot
// order, unpacked on the fly in registers (no tile written to memory). a_tiles[t] is the `a` of output columns
// [16t, 16t + 16): values fold a per-group scale into `a`. Needs 2, 4 or 8 bits and rows of a multiple of 16 bytes.
//
// One pass reads U 16-byte pieces of every row, at byte0: each piece holds 16 codes of each of the byte's PER
// planes, so the pass fills U * PER output tiles (plane i, piece u -> columns i * bytes + byte0 + 16u ...), with
// RT * U * PER accumulators in registers. AVX-512 intrinsics where the compiler's own vectorisation goes through
// memory (measured: a store-forwarding stall per row); plain loops that vectorise elsewhere. With LUT (bits <= 4), a
// code c reads as lut[c] (16 floats, a codebook's levels): one in-register permute instead of the int-to-float.
template <int BITS, int RT, int U, bool LUT>
inline void packed_pass(const float* const* a_tiles, int lda, const uint8_t* __restrict codes, int64_t row_stride,
                        const int* rows, int K, int bytes, int byte0, float* __restrict out, int ldo, bool accumulate,
                        const float* __restrict lut) {
  static_assert(!LUT || BITS <= 4, "codebooks are for 2, 3 and 4 bits");
  constexpr int kPer = per_byte(BITS), kTiles = U * kPer;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  int column[kTiles];
  const float* a[kTiles];
  for (int i = 0; i < kPer; ++i)
    for (int u = 0; u < U; ++u) {
      column[i * U + u] = i * bytes + byte0 + u * kLanes;
      a[i * U + u] = a_tiles[column[i * U + u] / kLanes];
    }
#if defined(__AVX512F__)
  const __m512i mask = _mm512_set1_epi32(kMask);
  const __m512 table = LUT ? _mm512_loadu_ps(lut) : _mm512_setzero_ps();
  __m512 acc[RT][kTiles];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < kTiles; ++t)
      acc[r][t] = accumulate ? _mm512_loadu_ps(out + r * ldo + column[t]) : _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const uint8_t* src = codes + (rows ? rows[k] : k) * row_stride + byte0;
    for (int u = 0; u < U; ++u) {
      const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + u * kLanes)));
      for (int i = 0; i < kPer; ++i) {
        __m512i field = i == 0 ? wide : _mm512_srli_epi32(wide, i * BITS);
        if (i + 1 < kPer) field = _mm512_and_si512(field, mask);  // the top field has nothing above it
        const __m512 b = LUT ? _mm512_permutexvar_ps(field, table) : _mm512_cvtepi32_ps(field);
        for (int r = 0; r < RT; ++r)
          acc[r][i * U + u] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * U + u][r * lda + k]), b, acc[r][i * U + u]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < kTiles; ++t) _mm512_storeu_ps(out + r * ldo + column[t], acc[r][t]);
#else
  float acc[RT][kTiles][kLanes];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < kTiles; ++t)
      for (int l = 0; l < kLanes; ++l) acc[r][t][l] = accumulate ? out[r * ldo + column[t] + l] : 0.0f;
  for (int k = 0; k < K; ++k) {
    const uint8_t* __restrict src = codes + (rows ? rows[k] : k) * row_stride + byte0;
    for (int u = 0; u < U; ++u)
      for (int i = 0; i < kPer; ++i) {
        float b[kLanes];
        if constexpr (LUT) {
          for (int l = 0; l < kLanes; ++l) b[l] = lut[(static_cast<uint32_t>(src[u * kLanes + l]) >> (i * BITS)) & kMask];
        } else {
#pragma omp simd
          for (int l = 0; l < kLanes; ++l)
            b[l] = static_cast<float>((static_cast<uint32_t>(src[u * kLanes + l]) >> (i * BITS)) & kMask);
        }
        for (int r = 0; r < RT; ++r) {
          const float ak = a[i * U + u][r * lda + k];
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) acc[r][i * U + u][l] += ak * b[l];
        }
      }
  }
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < kTiles; ++t)
      for (int l = 0; l < kLanes; ++l) out[r * ldo + column[t] + l] = acc[r][t][l];
#endif
}

#if defined(KVPACK_AVX2)
// The value of 8 codes as floats: lut[field] (16 levels in two registers) with LUT, else the field itself.
template <int BITS, bool LUT>
inline __m256 codes_as_floats(__m256i field, __m256 table_low, __m256 table_high) {
  if constexpr (!LUT) {
    return _mm256_cvtepi32_ps(field);
  } else if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(table_low, field);
  } else {
    const __m256 low = _mm256_permutevar8x32_ps(table_low, field);  // (uses the index's low 3 bits)
    const __m256 high = _mm256_permutevar8x32_ps(table_high, field);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(field, 28)));  // bit 3 selects
  }
}

// packed_pass for AVX2 (16 registers of 8 lanes): one pass reads C 8-byte pieces of every row at byte0 and fills the
// output columns of planes [P0, P0 + NP) of those bytes (plane i, piece c -> columns i * bytes + byte0 + 8c ...),
// with RT * C * NP <= 12 accumulators in registers. Intrinsics for the same reason as AVX-512's: the compiler's
// own vectorisation of the 16-lane loops keeps the accumulators in memory (measured on a Zen 3: 2.6 ms per call at
// 8k tokens on one thread, 0.8x SDPA). SHARED: every output tile has the same `a` (the keys' query rows; values
// with one scale group per row), broadcast once per row and k instead of once per tile.
template <int BITS, int RT, int C, int P0, int NP, bool LUT, bool SHARED>
inline void packed_pass_avx2(const float* const* a_tiles, int lda, const uint8_t* __restrict codes,
                             int64_t row_stride, const int* rows, int K, int bytes, int byte0, float* __restrict out,
                             int ldo, bool accumulate, const float* __restrict lut) {
  constexpr int kAcc = C * NP;
  static_assert(RT * kAcc <= 12, "accumulators beyond the registers");
  constexpr uint32_t kMask = (1u << BITS) - 1;
  int column[kAcc];
  const float* a[kAcc];
  for (int i = 0; i < NP; ++i)
    for (int c = 0; c < C; ++c) {
      column[i * C + c] = (P0 + i) * bytes + byte0 + c * 8;
      a[i * C + c] = a_tiles[column[i * C + c] / kLanes];
    }
  const __m256i mask = _mm256_set1_epi32(kMask);
  const __m256 table_low = LUT ? _mm256_loadu_ps(lut) : _mm256_setzero_ps();
  const __m256 table_high = LUT ? _mm256_loadu_ps(lut + 8) : _mm256_setzero_ps();
  __m256 acc[RT][kAcc];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < kAcc; ++t)
      acc[r][t] = accumulate ? _mm256_loadu_ps(out + r * ldo + column[t]) : _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const uint8_t* src = codes + (rows ? rows[k] : k) * row_stride + byte0;
    for (int c = 0; c < C; ++c) {
      const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c * 8)));
      __m256 shared[RT];
      if constexpr (SHARED)
        for (int r = 0; r < RT; ++r) shared[r] = _mm256_broadcast_ss(a[0] + r * lda + k);
      for (int i = 0; i < NP; ++i) {
        constexpr int kPer = per_byte(BITS);
        __m256i field = P0 + i == 0 ? wide : _mm256_srli_epi32(wide, (P0 + i) * BITS);
        if (P0 + i + 1 < kPer) field = _mm256_and_si256(field, mask);  // the top field has nothing above it
        const __m256 b = codes_as_floats<BITS, LUT>(field, table_low, table_high);
        for (int r = 0; r < RT; ++r)
          acc[r][i * C + c] = _mm256_fmadd_ps(SHARED ? shared[r] : _mm256_broadcast_ss(a[i * C + c] + r * lda + k), b,
                                              acc[r][i * C + c]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < kAcc; ++t) _mm256_storeu_ps(out + r * ldo + column[t], acc[r][t]);
}

// Every byte of the rows in passes of packed_pass_avx2: all planes at once where RT * planes fits the registers
// (with 2 pieces per pass where twice as many do), else the planes in two halves.
template <int BITS, int RT, bool LUT, bool SHARED>
void packed_passes_avx2(const float* const* a_tiles, int lda, const uint8_t* codes, int64_t row_stride,
                        const int* rows, int K, int bytes, float* out, int ldo, bool accumulate, const float* lut) {
  constexpr int kPer = per_byte(BITS);
  // 16 registers: the accumulators, the RT shared broadcasts, the mask, a piece's codes and their floats.
  constexpr int kMaxAcc = SHARED ? 13 - RT : 12;
  constexpr bool kAllPlanes = RT * kPer <= kMaxAcc, kTwoPieces = 2 * RT * kPer <= kMaxAcc;
  for (int byte0 = 0; byte0 < bytes; byte0 += kTwoPieces ? 16 : 8) {  // (rows are a multiple of 16 bytes)
    if constexpr (kTwoPieces) {
      packed_pass_avx2<BITS, RT, 2, 0, kPer, LUT, SHARED>(a_tiles, lda, codes, row_stride, rows, K, bytes, byte0, out,
                                                          ldo, accumulate, lut);
    } else if constexpr (kAllPlanes) {
      packed_pass_avx2<BITS, RT, 1, 0, kPer, LUT, SHARED>(a_tiles, lda, codes, row_stride, rows, K, bytes, byte0, out,
                                                          ldo, accumulate, lut);
    } else {
      packed_pass_avx2<BITS, RT, 1, 0, kPer / 2, LUT, SHARED>(a_tiles, lda, codes, row_stride, rows, K, bytes, byte0,
                                                              out, ldo, accumulate, lut);
      packed_pass_avx2<BITS, RT, 1, kPer / 2, kPer / 2, LUT, SHARED>(a_tiles, lda, codes, row_stride, rows, K, bytes,
                                                                     byte0, out, ldo, accumulate, lut);
    }
  }
}
#endif

template <int BITS, int RT, bool LUT>
void packed_passes(const float* const* a_tiles, int lda, const uint8_t* codes, int64_t row_stride, const int* rows,
                   int K, int bytes, float* out, int ldo, bool accumulate, const float* lut) {
#if defined(KVPACK_AVX2)
  bool shared = true;
  for (int t = 1; t < bytes * per_byte(BITS) / kLanes; ++t) shared &= a_tiles[t] == a_tiles[0];
  if (shared)
    packed_passes_avx2<BITS, RT, LUT, true>(a_tiles, lda, codes, row_stride, rows, K, bytes, out, ldo, accumulate, lut);
  else
    packed_passes_avx2<BITS, RT, LUT, false>(a_tiles, lda, codes, row_stride, rows, K, bytes, out, ldo, accumulate,
                                             lut);
#else
  // Up to 4 output tiles per pass (RT * 4 accumulators): U pieces of 16 bytes, U * codes per byte <= 4.
  constexpr int kMaxU = std::max(1, 4 / per_byte(BITS));
  int byte0 = 0;
  if constexpr (kMaxU >= 4)
    for (; byte0 + 4 * kLanes <= bytes; byte0 += 4 * kLanes)
      packed_pass<BITS, RT, 4, LUT>(a_tiles, lda, codes, row_stride, rows, K, bytes, byte0, out, ldo, accumulate,
                                   lut);
  if constexpr (kMaxU >= 2)
    for (; byte0 + 2 * kLanes <= bytes; byte0 += 2 * kLanes)
      packed_pass<BITS, RT, 2, LUT>(a_tiles, lda, codes, row_stride, rows, K, bytes, byte0, out, ldo, accumulate,
                                   lut);
  for (; byte0 < bytes; byte0 += kLanes)
    packed_pass<BITS, RT, 1, LUT>(a_tiles, lda, codes, row_stride, rows, K, bytes, byte0, out, ldo, accumulate, lut);
#endif
}

template <int BITS, bool LUT>
void packed_gemm_rows(const float* const* a_tiles, int lda, const uint8_t* codes, int64_t row_stride, const int* rows,
                      int R, int K, int N, float* out, int ldo, bool accumulate, const float* lut) {
  constexpr int kMaxTiles = 16;  // N <= 256
  const float* shifted[kMaxTiles];
  const int bytes = N / per_byte(BITS);
  for (int r = 0; r < R; r += 4) {
    for (int t = 0; t < N / kLanes; ++t) shifted[t] = a_tiles[t] + r * lda;
    float* o = out + r * ldo;
    switch (std::min(4, R - r)) {
      case 4: packed_passes<BITS, 4, LUT>(shifted, lda, codes, row_stride, rows, K, bytes, o, ldo, accumulate, lut); break;
      case 3: packed_passes<BITS, 3, LUT>(shifted, lda, codes, row_stride, rows, K, bytes, o, ldo, accumulate, lut); break;
      case 2: packed_passes<BITS, 2, LUT>(shifted, lda, codes, row_stride, rows, K, bytes, o, ldo, accumulate, lut); break;
      default: packed_passes<BITS, 1, LUT>(shifted, lda, codes, row_stride, rows, K, bytes, o, ldo, accumulate, lut);
    }
  }
}

// packed_gemm_rows reading code c as lut[c] when `lut` is given (a codebook: 2 or 4 bits here), else as c.
template <int BITS>
inline void packed_gemm_rows_levels(const float* const* a_tiles, int lda, const uint8_t* codes, int64_t row_stride,
                                    const int* rows, int R, int K, int N, float* out, int ldo, bool accumulate,
                                    const float* lut) {
  if constexpr (BITS <= 4) {
    if (lut) {
      packed_gemm_rows<BITS, true>(a_tiles, lda, codes, row_stride, rows, R, K, N, out, ldo, accumulate, lut);
      return;
    }
  }
  packed_gemm_rows<BITS, false>(a_tiles, lda, codes, row_stride, rows, R, K, N, out, ldo, accumulate, nullptr);
}

// Whether packed rows of n codes can be read by packed_gemm_rows.
constexpr bool fusable(int bits, int n) { return bits != 3 && n <= 256 && (n / per_byte(bits)) % kLanes == 0; }

// Dot product of two float rows of length n (a multiple of 16).
inline float dot(const float* __restrict a, const float* __restrict b, int n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int d = kLanes; d < n; d += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  return _mm512_reduce_add_ps(acc);
#elif defined(KVPACK_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int d = 0; d < n; d += kLanes) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  return reduce_add8(_mm256_add_ps(acc0, acc1));
#else
  float lanes[kLanes] = {};
  for (int d = 0; d < n; d += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define KVPACK_INTEGER_PRODUCTS 1
// Integer products (AVX-512 VNNI and VBMI; used when the call asks, `integer_products`): packed codes of 2 or 4
// bits multiplied as integers by `vpdpbusd`, which sums four 8-bit products per 32-bit lane, exactly. The float
// operand is rounded to two 8-bit digits per block and row (~16 bits; one digit measured +11% KL on the default model,
// two leave the output within ~1e-4 of the float path's):
//   Keys: qs = q * key_scale (per channel) by the step alpha = max|qs| / 127: score = alpha * sum_d (high_d +
//   low_d / 254) * code_d (+ the zero points' share, in float).
//   Values: p = weight * value_scale (per token and group) by beta = max p / 255: out += beta * sum_t (high_t +
//   low_t / 254) * code_t (+ the zero points' share, in float).
// Each rounding's share at the middle code, (2^bits - 1) / 2 * sum(rounding errors), is put back. The error bound:
// tests/quant/tolerances.py. 8-bit and 3-bit codes and codebooks stay in float.

constexpr float kLowDigits = 254.0f;  // the low digit's unit: 1 / 254 of the high one's

// Rows of x (n floats each, n % 16 == 0) rounded to two 8-bit digits each: x ~ step * (high + low / kLowDigits).
// SIGNED (the query): step = max|x| / 127, high = round(x / step) in [-127, 127] as int8; else (the weights, >= 0):
// step = max x / 255, high = floor(x / step) in [0, 255] as uint8. low (same type) is the rest rounded, in units of
// 1 / kLowDigits. Digits at digits[r * n + i] (high) and digits[R * n + r * n + i] (low); residual[r] = sum_i (x -
// what the digits say), the rounding error the caller puts back at the middle code.
template <bool SIGNED>
inline void two_digits(const float* x, int R, int n, void* digits_out, float* step_out, float* residual) {
  auto* digits = static_cast<uint8_t*>(digits_out);
  const __m512 units = _mm512_set1_ps(kLowDigits), unit = _mm512_set1_ps(1.0f / kLowDigits);
  constexpr float kTop = SIGNED ? 127.0f : 255.0f;
  auto store = [](uint8_t* at, __m512i v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at), SIGNED ? _mm512_cvtsepi32_epi8(v) : _mm512_cvtusepi32_epi8(v));
  };
  for (int r = 0; r < R; ++r) {
    const float* row = x + static_cast<int64_t>(r) * n;
    __m512 top = _mm512_setzero_ps();
    for (int i = 0; i < n; i += kLanes)
      top = _mm512_max_ps(top, SIGNED ? _mm512_abs_ps(_mm512_loadu_ps(row + i)) : _mm512_loadu_ps(row + i));
    const float most = _mm512_reduce_max_ps(top);
    step_out[r] = most / kTop;
    const __m512 inverse = _mm512_set1_ps(most > 0.0f ? kTop / most : 0.0f), step = _mm512_set1_ps(step_out[r]);
    __m512 left = _mm512_setzero_ps();
    for (int i = 0; i < n; i += kLanes) {
      const __m512 value = _mm512_loadu_ps(row + i), steps = _mm512_mul_ps(value, inverse);
      const __m512 high = _mm512_roundscale_ps(
          steps, (SIGNED ? _MM_FROUND_TO_NEAREST_INT : _MM_FROUND_TO_NEG_INF) | _MM_FROUND_NO_EXC);
      store(digits + r * n + i, _mm512_cvtps_epi32(high));
      const __m512i low = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(steps, high), units));
      store(digits + (R + r) * n + i, low);
      left = _mm512_add_ps(left, _mm512_fnmadd_ps(step, _mm512_fmadd_ps(_mm512_cvtepi32_ps(low), unit, high), value));
    }
    residual[r] = _mm512_reduce_add_ps(left);
  }
}

// One pass of an integer product over packed rows (AVX-512 VNNI): for RT rows r from r0 and the output tiles of
// PIECES 16-byte pieces from byte piece0 * 16 of every packed row (plane i, piece p -> columns i * bytes + 16 p ...,
// the planar order of unpack_planar),
//   out[r][column] (+)= step[tile][r] * sum_k operand[tile][r][k] * code[k][column]
// over the K packed rows (consecutive, `bytes` apart). Four rows' pieces are gathered into one register and
// transposed (vpermb) so that each 32-bit lane holds the byte of one column from each of the four rows; each plane
// is then a shift and a mask away, and `vpdpbusd` multiplies it with the four rows' operands (broadcast) and sums
// the four products into the lane, exactly in int32. Keys (VALUES false): the operand is the int8 query, the codes
// are unsigned. Values: the operand is the uint8 weights, the codes (< 128) are read as signed.
// Each operand has two digits, the low one `low_offset` bytes after the high one (operand ~ high + low / kLowDigits),
// multiplied into accumulators of their own.
template <int BITS, int RT, int PIECES, bool VALUES>
inline void integer_pass(const int8_t* const* operand, int operand_stride, int low_offset, const float* const* step,
                         const uint8_t* __restrict codes, int bytes, int K, int piece0, int r0, float* __restrict out,
                         int ldo, bool accumulate, int64_t prefetch) {
  constexpr int kPer = 8 / BITS, kDigits = 2;
  __m512i acc[kDigits][RT][kPer][PIECES];
  for (int n = 0; n < kDigits; ++n)
    for (int r = 0; r < RT; ++r)
      for (int i = 0; i < kPer; ++i)
        for (int p = 0; p < PIECES; ++p) acc[n][r][i][p] = _mm512_setzero_si512();
  alignas(64) static const uint8_t order[64] = {
      0, 16, 32, 48, 1, 17, 33, 49, 2,  18, 34, 50, 3,  19, 35, 51, 4,  20, 36, 52, 5,  21, 37, 53,
      6, 22, 38, 54, 7, 23, 39, 55, 8,  24, 40, 56, 9,  25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};  // byte 4s + c <- row c's byte s
  const __m512i transpose = _mm512_load_si512(order);
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const int8_t* ops[kPer][PIECES];
  for (int i = 0; i < kPer; ++i)
    for (int p = 0; p < PIECES; ++p)
      ops[i][p] = operand[(i * bytes + (piece0 + p) * kLanes) / kLanes] + r0 * operand_stride;
  for (int k = 0; k < K; k += 4) {
    const uint8_t* row = codes + static_cast<int64_t>(k) * bytes + piece0 * kLanes;
    if (prefetch)  // these four rows of a later block, spread over the pass (a burst would fill the line buffers)
      for (int line = 0; line < 4 * bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + prefetch + line), _MM_HINT_T0);
    for (int p = 0; p < PIECES; ++p) {
      const uint8_t* at = row + p * kLanes;
      __m512i x = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + bytes)), 1);
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 2 * bytes)), 2);
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 3 * bytes)), 3);
      x = _mm512_permutexvar_epi8(transpose, x);
      for (int i = 0; i < kPer; ++i) {
        const __m512i field = _mm512_and_si512(i == 0 ? x : _mm512_srli_epi16(x, i * BITS), mask);
        for (int n = 0; n < kDigits; ++n)
          for (int r = 0; r < RT; ++r) {
            int32_t four;
            std::memcpy(&four, ops[i][p] + r * operand_stride + n * low_offset + k, sizeof(four));
            acc[n][r][i][p] = VALUES ? _mm512_dpbusd_epi32(acc[n][r][i][p], _mm512_set1_epi32(four), field)
                                     : _mm512_dpbusd_epi32(acc[n][r][i][p], field, _mm512_set1_epi32(four));
          }
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int i = 0; i < kPer; ++i)
      for (int p = 0; p < PIECES; ++p) {
        const int column = i * bytes + (piece0 + p) * kLanes;
        float* o = out + (r0 + r) * ldo + column;
        const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1][r][i][p]), _mm512_set1_ps(1.0f / kLowDigits),
                                           _mm512_cvtepi32_ps(acc[0][r][i][p]));
        const __m512 scaled = _mm512_mul_ps(_mm512_set1_ps(step[column / kLanes][r0 + r]), sum);
        _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o), scaled) : scaled);
      }
}

template <int BITS, int RT, bool VALUES>
void integer_passes(const int8_t* const* operand, int operand_stride, int low_offset, const float* const* step,
                    const uint8_t* codes, int bytes, int K, int r0, float* out, int ldo, bool accumulate,
                    int64_t prefetch) {
  // One 16-byte piece per pass: up to 4 rows x 2 digits x 4 planes (2-bit) accumulators. The first pass prefetches.
  for (int piece = 0; piece * kLanes < bytes; ++piece)
    integer_pass<BITS, RT, 1, VALUES>(operand, operand_stride, low_offset, step, codes, bytes, K, piece, r0, out, ldo,
                                      accumulate, piece == 0 && r0 == 0 ? prefetch : 0);
}

// The integer product for R rows (in passes of up to 4): K packed rows of `bytes` bytes (a multiple of 16), K % 4 == 0.
template <int BITS, bool VALUES>
void integer_product(const int8_t* const* operand, int operand_stride, int low_offset, const float* const* step,
                     const uint8_t* codes, int bytes, int R, int K, float* out, int ldo, bool accumulate,
                     int64_t prefetch) {
  for (int r = 0; r < R; r += 4) {
    const int rows = std::min(4, R - r);
    if (rows == 4)
      integer_passes<BITS, 4, VALUES>(operand, operand_stride, low_offset, step, codes, bytes, K, r, out, ldo,
                                      accumulate, prefetch);
    else if (rows == 3)
      integer_passes<BITS, 3, VALUES>(operand, operand_stride, low_offset, step, codes, bytes, K, r, out, ldo,
                                      accumulate, prefetch);
    else if (rows == 2)
      integer_passes<BITS, 2, VALUES>(operand, operand_stride, low_offset, step, codes, bytes, K, r, out, ldo,
                                      accumulate, prefetch);
    else
      integer_passes<BITS, 1, VALUES>(operand, operand_stride, low_offset, step, codes, bytes, K, r, out, ldo,
                                      accumulate, prefetch);
  }
}

#endif

struct Layer {
  const float* q;
  const float* q_packed;
  const int64_t* row_query;
  const uint8_t* key_codes;
  const at::Half* key_scale;
  const at::Half* key_zero;
  const uint8_t* value_codes;
  const at::Half* value_scale;
  const at::Half* value_zero;
  const float* exact_keys;
  const float* exact_values;
  const float* bias;
  int64_t kc_s0, kc_s1, kc_s2, ks_s0, ks_s1, ks_s2;  // strides (elements) of the packed key tensors
  int64_t vc_s0, vc_s1, vc_s2, vs_s0, vs_s1, vs_s2;  // and of the packed value tensors
  int64_t ek_s0, ek_s1, ek_s2, ev_s0, ev_s1, ev_s2;  // and of the exact tokens
  int64_t bias_s0, bias_s1;
  int H, R, D, Dv, G, VG, blocks, n_exact, sink_len, key_bits, value_bits;
  bool key_lut, value_lut;                     // codebook levels in key_levels / value_levels (else uniform codes)
  bool integer_keys, integer_values;           // integer products (integer_product) for keys / values
  alignas(64) float key_levels[16], value_levels[16];  // zero-padded to 16 (one AVX-512 register)
};

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes (the same polynomial; vscalefps applies 2^n).
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Correction), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}
#endif

#if defined(KVPACK_AVX2)
// exp_nonpositive on 8 lanes (the same polynomial; 2^n built in the exponent bits, n in [-126, 0]).
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 clamped = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Correction), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23));
  const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);  // below -87 (or -inf, NaN): 0
  return _mm256_and_ps(kept, _mm256_mul_ps(p, scale));
}
#endif

// Max of n floats (at least `start`).
inline float row_max(const float* s, int n, float start) {
  int t = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(start);
  for (; t + kLanes <= n; t += kLanes) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  if (t < n) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, (1u << (n - t)) - 1, s + t));
  return _mm512_reduce_max_ps(m);
#else
  float m = start;
#if defined(KVPACK_AVX2)
  __m256 m8 = _mm256_set1_ps(start);
  for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + t));
  m = reduce_max8(m8);
#endif
  for (; t < n; ++t) m = std::max(m, s[t]);
  return m;
#endif
}

// s[t] = exp(s[t] - top) for n floats; returns their sum.
inline float exp_row(float* s, int n, float top) {
  int t = 0;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (; t + kLanes <= n; t += kLanes) {
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + t), shift));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (t < n) {
    const __mmask16 tail = (1u << (n - t)) - 1;
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), shift));
    _mm512_mask_storeu_ps(s + t, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.0f;
#if defined(KVPACK_AVX2)
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + t), shift));
    _mm256_storeu_ps(s + t, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  sum = reduce_add8(sum8);
#endif
  for (; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - top);
    sum += s[t];
  }
  return sum;
#endif
}

// The online-softmax step of one tile of n tokens: scores [R][n] (bias included) become weights, and the running
// top / total / result (and the value zero points' share, when given) are rescaled to the new maxima.
void softmax_tile(int R, int n, float* scores, float* top, float* total, float* result, int Dv, float* zero_acc,
                  int n_groups) {
  for (int r = 0; r < R; ++r) {
    float* s = scores + r * n;
    const float tile_top = row_max(s, n, top[r]);
    const float correction = exp_nonpositive(top[r] - tile_top);
    top[r] = tile_top;
    total[r] = total[r] * correction + exp_row(s, n, tile_top);
    if (correction != 1.0f) {
#pragma omp simd
      for (int c = 0; c < Dv; ++c) result[r * Dv + c] *= correction;
      for (int g = 0; g < n_groups; ++g) zero_acc[r * n_groups + g] *= correction;
    }
  }
}

// Per-thread scratch floats and ints, grown as needed and reused by every item the thread runs (no allocation
// per item once warm). Pointers carved from it stay valid until the next `floats` / `ints` call on the thread.
inline float* scratch_floats(size_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}
inline int* scratch_ints(size_t n) {
  thread_local std::vector<int> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// One item: online softmax over packed blocks [first, last) of (b, h); writes max, sum and weighted value sums.
// Scores and value rows are kept in the keys' planar token order, and value channels in planar channel order
// until the end; a block's rows are whole bytes (G and Dv are multiples of 16) lying contiguously.
template <int KB, int VB>
void attend_packed(const Layer& L, int b, int h, int first, int last, float* top, float* total, float* result) {
  const int R = L.R, D = L.D, Dv = L.Dv, G = L.G, VG = L.VG, n_groups = Dv / VG;
  constexpr int kKeyPer = per_byte(KB), kValuePer = per_byte(VB);
  // Fused paths read codes straight from the cache (2/4/8 bits, rows a multiple of 16 bytes); values also need
  // every 16-column output tile to lie in one scale group. 3-bit (or small) rows are unpacked into a tile first.
  constexpr int kFusedKB = KB == 3 ? 8 : KB, kFusedVB = VB == 3 ? 8 : VB;  // (3 bits never take the fused path)
  const bool keys_fused = fusable(KB, G);
  bool values_fused = fusable(VB, Dv);
  const float* key_lut = L.key_lut ? L.key_levels : nullptr;
  const float* value_lut = L.value_lut ? L.value_levels : nullptr;

  int* ints = scratch_ints(2 * G + Dv);
  int* token_of_slot = ints;             // [G]: the token of each planar key slot
  int* group_of_channel_slot = ints + G;  // [Dv]: the scale group of each planar value channel slot
  int* slot_of_token = ints + G + Dv;     // [G]: the inverse of token_of_slot
  for (int slot = 0; slot < G; ++slot) token_of_slot[slot] = planar_to_index(slot, G, kKeyPer);
  for (int slot = 0; slot < G; ++slot) slot_of_token[token_of_slot[slot]] = slot;
  for (int slot = 0; slot < Dv; ++slot) group_of_channel_slot[slot] = planar_to_index(slot, Dv, kValuePer) / VG;

  const size_t sizes[] = {
      static_cast<size_t>(D) * G,             // key_tile (unfused keys)
      static_cast<size_t>(D) * 2,             // kscale, kzero
      static_cast<size_t>(R) * D + R,         // qs, base
      static_cast<size_t>(R) * G,             // scores
      static_cast<size_t>(G) * Dv * 2,        // raw_values, value_tile (unfused values)
      static_cast<size_t>(G) * n_groups * 4,  // vscale, vzero, slot_scale, slot_zero
      static_cast<size_t>(R) * n_groups,      // zero_acc
      static_cast<size_t>(R) * Dv,            // planar
      static_cast<size_t>(n_groups) * R * G,  // scaled_weights
      static_cast<size_t>(R) * D / 2 + R,     // qi (int8, two digits) and alpha, for integer scores
      static_cast<size_t>(R) * G + n_groups * R * (G / 2 + 2) + R,  // token-order weights, wi, beta, residuals
  };
  size_t needed = 0;
  for (size_t size : sizes) needed += size;
  float* next = scratch_floats(needed);
  auto take = [&next](size_t n) {
    float* taken = next;
    next += n;
    return taken;
  };
  float* key_tile = take(sizes[0]);
  float* kscale = take(D);
  float* kzero = take(D);
  float* qs = take(static_cast<size_t>(R) * D);
  float* base = take(R);
  float* scores = take(sizes[3]);
  float* raw_values = take(static_cast<size_t>(G) * Dv);
  float* value_tile = take(static_cast<size_t>(G) * Dv);
  float* vscale = take(static_cast<size_t>(G) * n_groups);
  float* vzero = take(static_cast<size_t>(G) * n_groups);
  float* slot_scale = take(static_cast<size_t>(G) * n_groups);
  float* slot_zero = take(static_cast<size_t>(G) * n_groups);
  float* zero_acc = take(sizes[6]);
  float* planar = take(sizes[7]);
  float* scaled_weights = take(sizes[8]);
  float* alpha = take(R);
  int8_t* qi = reinterpret_cast<int8_t*>(take(static_cast<size_t>(R) * D / 2));
  constexpr int kMaxTiles = 16;  // head dims and groups <= 256
  float* token_weights = take(static_cast<size_t>(R) * G);
  uint8_t* wi = reinterpret_cast<uint8_t*>(take(static_cast<size_t>(n_groups) * R * G / 2));
  float* beta = take(static_cast<size_t>(n_groups) * R);
  float* left = take(static_cast<size_t>(n_groups) * R + R);  // rounding residuals of the integer operands
  constexpr float kMiddleKey = ((1 << KB) - 1) / 2.0f, kMiddleValue = ((1 << VB) - 1) / 2.0f;
#ifdef KVPACK_INTEGER_PRODUCTS
  // The integer products' operands and steps per output tile: keys, the int8 query rows and their steps; values,
  // the uint8 weights and steps of the tile's scale group.
  const int8_t* key_operands[kMaxTiles];
  const float* key_steps[kMaxTiles];
  for (int t = 0; t < G / kLanes && t < kMaxTiles; ++t) key_operands[t] = qi, key_steps[t] = alpha;
  const int8_t* value_operands[kMaxTiles];
  const float* value_steps[kMaxTiles];
  for (int t = 0; t < Dv / kLanes && t < kMaxTiles; ++t) {
    const int group = group_of_channel_slot[t * kLanes];
    value_operands[t] = reinterpret_cast<const int8_t*>(wi) + group * R * G, value_steps[t] = beta + group * R;
  }
#endif
  std::fill(zero_acc, zero_acc + sizes[6], 0.0f);
  std::fill(planar, planar + sizes[7], 0.0f);

  const float* qs_tiles[kMaxTiles];
  const float* value_tiles[kMaxTiles];
  for (int t = 0; t < G / kLanes && t < kMaxTiles; ++t) qs_tiles[t] = qs;
  for (int t = 0; t < Dv / kLanes && values_fused; ++t) {
    const int first_group = group_of_channel_slot[t * kLanes];
    for (int l = 1; l < kLanes; ++l) values_fused &= group_of_channel_slot[t * kLanes + l] == first_group;
    value_tiles[t] = scaled_weights + first_group * R * G;
  }
#ifdef KVPACK_INTEGER_PRODUCTS
  // (L says which bit widths and codes; values also need each output tile in one scale group, as fused ones do)
  const bool integer_keys = L.integer_keys, integer_values = L.integer_values && values_fused;
#else
  constexpr bool integer_keys = false, integer_values = false;
#endif
  const float* q = L.q_packed + (static_cast<int64_t>(b) * L.H + h) * R * D;
  for (int block = first; block < last; ++block) {
    const int64_t key_at = b * L.kc_s0 + h * L.kc_s1 + block * L.kc_s2;
    const int64_t params_at = b * L.ks_s0 + h * L.ks_s1 + block * L.ks_s2;
    // The next block's codes are prefetched while this one is computed: by the integer passes as they go
    // (integer_pass), else here, into L2.
    const bool ahead = block + kPrefetchBlocks < last;
    const int64_t key_ahead = ahead ? kPrefetchBlocks * L.kc_s2 : 0;
    const int64_t value_ahead = ahead ? kPrefetchBlocks * static_cast<int64_t>(G) * L.vc_s2 : 0;
#if defined(__AVX512F__)
    const char* key_next = reinterpret_cast<const char*>(L.key_codes + key_at + key_ahead);
    const char* value_next = reinterpret_cast<const char*>(L.value_codes + b * L.vc_s0 + h * L.vc_s1 +
                                                           static_cast<int64_t>(block) * G * L.vc_s2 + value_ahead);
    if (ahead && !integer_keys)
      for (int line = 0; line < D * G * KB / 8; line += 64) _mm_prefetch(key_next + line, _MM_HINT_T1);
    if (ahead && !integer_values)
      for (int line = 0; line < G * Dv * VB / 8; line += 64) _mm_prefetch(value_next + line, _MM_HINT_T1);
#endif
    halves_to_floats(L.key_scale + params_at, D, kscale);
    halves_to_floats(L.key_zero + params_at, D, kzero);
    // Scores: (q * scale) . codes + q . zero.
    for (int r = 0; r < R; ++r) {
#pragma omp simd
      for (int d = 0; d < D; ++d) qs[r * D + d] = q[r * D + d] * kscale[d];
      base[r] = dot(q + r * D, kzero, D);
    }
    bool scored = false;
#ifdef KVPACK_INTEGER_PRODUCTS
    if constexpr (KB == 2 || KB == 4) {
      if (integer_keys) {
        two_digits<true>(qs, R, D, qi, alpha, left);
        // The query's rounding moves every score of the block by sum_d e_d * code_d (e = qs - alpha * qi): its
        // share at the middle code is the same for all, and is put back.
        for (int r = 0; r < R; ++r) base[r] += kMiddleKey * left[r];
        integer_product<KB == 2 ? 2 : 4, false>(key_operands, D, R * D, key_steps, L.key_codes + key_at,
                                                G * KB / 8, R, D, scores, G, false, key_ahead);
        scored = true;
      }
    }
#endif
    if (!scored && keys_fused) {
      packed_gemm_rows_levels<kFusedKB>(qs_tiles, D, L.key_codes + key_at, G * KB / 8, nullptr, R, D, G, scores, G,
                                        false, key_lut);
    } else if (!scored) {
      if (L.key_lut)
        unpack_planar<KB, true>(L.key_codes + key_at, D, G, key_tile, L.key_levels);
      else
        unpack_planar<KB, false>(L.key_codes + key_at, D, G, key_tile, nullptr);
      gemm_rows(qs, D, key_tile, G, R, D, G, scores, G, false);
    }
    const int64_t token0 = static_cast<int64_t>(block) * G;
    for (int r = 0; r < R; ++r) {
      float* s = scores + r * G;
#pragma omp simd
      for (int t = 0; t < G; ++t) s[t] += base[r];
      if (L.bias) {
        const float* bias_row = L.bias + b * L.bias_s0 + L.row_query[r] * L.bias_s1 + L.sink_len + token0;
        for (int slot = 0; slot < G; ++slot) s[slot] += bias_row[token_of_slot[slot]];
      }
    }
    softmax_tile(R, G, scores, top, total, planar, Dv, zero_acc, n_groups);
    // Values: rows in token order, unpacked (planar channels) and moved to their token's key slot, scales folded
    // in; the zero points' share is summed apart, per group.
    const int64_t values_at = b * L.vc_s0 + h * L.vc_s1 + token0 * L.vc_s2;
    const int64_t vparams_at = b * L.vs_s0 + h * L.vs_s1 + token0 * L.vs_s2;
    halves_to_floats(L.value_scale + vparams_at, G * n_groups, vscale);
    halves_to_floats(L.value_zero + vparams_at, G * n_groups, vzero);
#ifdef KVPACK_INTEGER_PRODUCTS
    if constexpr (VB == 2 || VB == 4) {
      if (integer_values) {
        // In token order (value rows are stored so): weight * scale per group as uint8 by row, and the zero points'
        // share in float.
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < G; t += kLanes)
            _mm512_storeu_ps(token_weights + r * G + t,
                             _mm512_i32gather_ps(_mm512_loadu_si512(slot_of_token + t), scores + r * G, 4));
        // Scales and zero points by group ([g][t]: slot_scale and slot_zero, here in token order).
        const float *group_scale = vscale, *group_zero = vzero;
        if (n_groups > 1) {
          for (int t = 0; t < G; ++t)
            for (int g = 0; g < n_groups; ++g) {
              slot_scale[g * G + t] = vscale[t * n_groups + g];
              slot_zero[g * G + t] = vzero[t * n_groups + g];
            }
          group_scale = slot_scale, group_zero = slot_zero;
        }
        for (int g = 0; g < n_groups; ++g)
          for (int r = 0; r < R; ++r) {
            const float* w = token_weights + r * G;
            const float* scale = group_scale + g * G;
            float* dst = scaled_weights + (g * R + r) * G;
#pragma omp simd
            for (int t = 0; t < G; ++t) dst[t] = w[t] * scale[t];
            zero_acc[r * n_groups + g] += dot(w, group_zero + g * G, G);
          }
        two_digits<false>(scaled_weights, n_groups * R, G, wi, beta, left);
        for (int g = 0; g < n_groups; ++g)  // the weights' rounding at the middle code, as for the keys
          for (int r = 0; r < R; ++r) zero_acc[r * n_groups + g] += kMiddleValue * left[g * R + r];
        integer_product<VB, true>(value_operands, G, n_groups * R * G, value_steps, L.value_codes + values_at,
                                  Dv * VB / 8, R, G, planar, Dv, true, value_ahead);
        continue;
      }
    }
#endif
    for (int g = 0; g < n_groups; ++g)
      for (int slot = 0; slot < G; ++slot) {
        slot_scale[g * G + slot] = vscale[token_of_slot[slot] * n_groups + g];
        slot_zero[g * G + slot] = vzero[token_of_slot[slot] * n_groups + g];
      }
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < n_groups; ++g) zero_acc[r * n_groups + g] += dot(scores + r * G, slot_zero + g * G, G);
    if (values_fused) {
      // Fold each token's scale of group g into the weights: a_g[r][slot] = weight * scale.
      for (int g = 0; g < n_groups; ++g)
        for (int r = 0; r < R; ++r) {
          float* dst = scaled_weights + (g * R + r) * G;
          const float* weights = scores + r * G;
          const float* scale = slot_scale + g * G;
#pragma omp simd
          for (int slot = 0; slot < G; ++slot) dst[slot] = weights[slot] * scale[slot];
        }
      packed_gemm_rows_levels<kFusedVB>(value_tiles, G, L.value_codes + values_at, Dv * VB / 8, token_of_slot, R, G,
                                        Dv, planar, Dv, true, value_lut);
    } else {
      if (L.value_lut)
        unpack_planar<VB, true>(L.value_codes + values_at, G, Dv, raw_values, L.value_levels);
      else
        unpack_planar<VB, false>(L.value_codes + values_at, G, Dv, raw_values, nullptr);
      for (int slot = 0; slot < G; ++slot) {
        const int t = token_of_slot[slot];
        const float* src = raw_values + t * Dv;
        const float* scale = vscale + t * n_groups;
        float* dst = value_tile + slot * Dv;
#pragma omp simd
        for (int c = 0; c < Dv; ++c) dst[c] = src[c] * scale[group_of_channel_slot[c]];
      }
      gemm_rows(scores, G, value_tile, Dv, R, G, Dv, planar, Dv, true);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int slot = 0; slot < Dv; ++slot) {
      const int c = planar_to_index(slot, Dv, kValuePer);
      result[r * Dv + c] = planar[r * Dv + slot] + zero_acc[r * n_groups + c / VG];
    }
}

// The item of the exact tokens (sinks, residual, new): the same online softmax over float32 keys and values,
// in tiles of kExactTile tokens.
void attend_exact(const Layer& L, int b, int h, float* top, float* total, float* result) {
  const int R = L.R, D = L.D, Dv = L.Dv, packed = L.blocks * L.G;
  const float* q = L.q + (static_cast<int64_t>(b) * L.H + h) * R * D;
  float* scores = scratch_floats(static_cast<size_t>(R) * kExactTile);
  for (int e0 = 0; e0 < L.n_exact; e0 += kExactTile) {
    const int n = std::min(kExactTile, L.n_exact - e0);
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < n; ++t) {
        const int e = e0 + t;
        float score = dot(q + r * D, L.exact_keys + b * L.ek_s0 + h * L.ek_s1 + e * L.ek_s2, D);
        if (L.bias) score += L.bias[b * L.bias_s0 + L.row_query[r] * L.bias_s1 + (e < L.sink_len ? e : e + packed)];
        scores[r * n + t] = score;
      }
    softmax_tile(R, n, scores, top, total, result, Dv, nullptr, 0);
    gemm_rows(scores, n, L.exact_values + b * L.ev_s0 + h * L.ev_s1 + e0 * L.ev_s2, L.ev_s2, R, n, Dv, result, Dv,
              true);
  }
}

using PackedItemFn = void (*)(const Layer&, int, int, int, int, float*, float*, float*);

template <int KB>
PackedItemFn packed_item_for_values(int value_bits) {
  switch (value_bits) {
    case 2: return attend_packed<KB, 2>;
    case 3: return attend_packed<KB, 3>;
    case 4: return attend_packed<KB, 4>;
    case 8: return attend_packed<KB, 8>;
  }
  TORCH_CHECK(false, "kvpack: unsupported value bit width ", value_bits);
}

PackedItemFn packed_item(const Layer& L) {
  switch (L.key_bits) {
    case 2: return packed_item_for_values<2>(L.value_bits);
    case 3: return packed_item_for_values<3>(L.value_bits);
    case 4: return packed_item_for_values<4>(L.value_bits);
    case 8: return packed_item_for_values<8>(L.value_bits);
  }
  TORCH_CHECK(false, "kvpack: unsupported key bit width ", L.key_bits);
}

}  // namespace

using OptionalTensor = c10::optional<at::Tensor>;

// A float32 tensor's data, or nullptr when absent; checks the layout the kernel reads.
const float* matrix_or_null(const OptionalTensor& t, int64_t rows, int64_t cols, const char* name) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->dtype() == torch::kFloat32 && t->numel() == rows * cols, "kvpack: ", name,
              " must be contiguous float32 with ", rows * cols, " elements");
  return t->data_ptr<float>();
}

// `kvpack::packed_attention` on CPU (the schema and its other implementations: kvpack/attention/op.py).
//   query         float32 [B, Hq, Q, D], any strides (scaled by `scaling`, and rotated by key_rotation for the
//                 packed keys, here)
//   exact_keys/values  float32 [B, H, >=exact_tokens, D / Dv], rows contiguous: the first `exact_tokens` are read
//   key_*, value_*     the packed tokens (see the top of this file); `packed_tokens` of them are read (blocks =
//                 packed_tokens / G), the tensors may have more capacity along dim 2
//   key_rotation  float32 [D, D] R_k when the packed keys are stored rotated (scored with q @ R_k), or None
// Output: float32 [B, Q, Hq, Dv] (the layout transformers' attention functions return).
at::Tensor packed_attention(const at::Tensor& query, const at::Tensor& exact_keys, const at::Tensor& exact_values,
                            int64_t exact_tokens, int64_t sink_len, const OptionalTensor& key_codes,
                            const OptionalTensor& key_scale, const OptionalTensor& key_zero,
                            const OptionalTensor& value_codes, const OptionalTensor& value_scale,
                            const OptionalTensor& value_zero, int64_t packed_tokens, int64_t key_bits,
                            int64_t value_bits, int64_t value_group, const OptionalTensor& key_rotation,
                            const OptionalTensor& value_rotation, const OptionalTensor& key_levels,
                            const OptionalTensor& value_levels, const OptionalTensor& bias, double scaling,
                            bool integer_products) {
  TORCH_CHECK(query.dim() == 4 && query.dtype() == torch::kFloat32, "kvpack: query must be float32 [B, Hq, Q, D]");
  TORCH_CHECK(exact_keys.dtype() == torch::kFloat32 && exact_values.dtype() == torch::kFloat32,
              "kvpack: exact keys/values must be float32");
  TORCH_CHECK(exact_keys.stride(3) == 1 && exact_values.stride(3) == 1, "kvpack: exact rows must be contiguous");
  TORCH_CHECK(exact_tokens <= exact_keys.size(2) && exact_tokens <= exact_values.size(2),
              "kvpack: exact_tokens exceeds the exact buffers");
  const int B = query.size(0), Hq = query.size(1), Q = query.size(2), D = query.size(3);
  const int H = exact_keys.size(1), Dv = exact_values.size(3);
  TORCH_CHECK(H > 0 && Hq % H == 0 && exact_keys.size(3) == D, "kvpack: query heads must be a multiple of kv heads");
  const int group = Hq / H, R = group * Q;
  const bool packed = packed_tokens > 0;
  // q and q_packed [B, H, R, D]: row r of kv head h is query head h * group + r / Q, new token r % Q.
  std::vector<float> q_rows(static_cast<size_t>(B) * H * R * D);
  const auto qa = query.accessor<float, 4>();
  for (int b = 0; b < B; ++b)
    for (int hq = 0; hq < Hq; ++hq)
      for (int t = 0; t < Q; ++t) {
        float* dst = q_rows.data() + ((static_cast<int64_t>(b) * H + hq / group) * R + (hq % group) * Q + t) * D;
        for (int d = 0; d < D; ++d) dst[d] = qa[b][hq][t][d] * static_cast<float>(scaling);
      }
  const float* rotation_k = matrix_or_null(key_rotation, D, D, "key_rotation");
  std::vector<float> q_rotated(rotation_k && packed ? q_rows.size() : 0);
  for (size_t row = 0; row < q_rotated.size() / D; ++row)  // q_packed = q @ R_k
    for (int d = 0; d < D; ++d) {
      float sum = 0.0f;
      for (int e = 0; e < D; ++e) sum += q_rows[row * D + e] * rotation_k[static_cast<int64_t>(e) * D + d];
      q_rotated[row * D + d] = sum;
    }
  std::vector<int64_t> row_query(R);
  for (int r = 0; r < R; ++r) row_query[r] = r % Q;

  Layer L{};
  L.q = q_rows.data();
  L.q_packed = q_rotated.empty() ? q_rows.data() : q_rotated.data();
  L.row_query = row_query.data();
  L.exact_keys = exact_keys.data_ptr<float>();
  L.exact_values = exact_values.data_ptr<float>();
  const bool biased = bias.has_value() && bias->defined() && bias->numel() > 0;
  if (biased) {
    TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->dim() == 3 && bias->stride(2) == 1,
                "kvpack: bias must be float32 [B, Q, tokens] with contiguous rows");
    L.bias = bias->data_ptr<float>();
    L.bias_s0 = bias->stride(0), L.bias_s1 = bias->stride(1);
  }
  L.ek_s0 = exact_keys.stride(0), L.ek_s1 = exact_keys.stride(1), L.ek_s2 = exact_keys.stride(2);
  L.ev_s0 = exact_values.stride(0), L.ev_s1 = exact_values.stride(1), L.ev_s2 = exact_values.stride(2);
  L.H = H, L.R = R, L.D = D, L.Dv = Dv, L.n_exact = exact_tokens, L.sink_len = sink_len;
  L.key_bits = key_bits, L.value_bits = value_bits, L.VG = value_group;
  // Codebook levels, copied into the zero-padded tables every item reads (one 64-byte line each).
  auto set_levels = [](const OptionalTensor& levels, int64_t bits, float* table, bool* on, const char* name) {
    std::fill(table, table + 16, 0.0f);
    const float* given = matrix_or_null(levels, 1, int64_t{1} << bits, name);
    *on = given != nullptr;
    TORCH_CHECK(!*on || bits <= 4, "kvpack: ", name, " need bits <= 4");
    if (*on) std::copy(given, given + (int64_t{1} << bits), table);
  };
  int blocks = 0;
  if (packed) {
    TORCH_CHECK(key_codes.has_value() && key_scale.has_value() && key_zero.has_value() && value_codes.has_value() &&
                    value_scale.has_value() && value_zero.has_value(),
                "kvpack: packed tokens need every packed tensor");
    const at::Tensor &kc = *key_codes, &ks = *key_scale, &kz = *key_zero;
    const at::Tensor &vc = *value_codes, &vs = *value_scale, &vz = *value_zero;
    set_levels(key_levels, key_bits, L.key_levels, &L.key_lut, "key_levels");
    set_levels(value_levels, value_bits, L.value_levels, &L.value_lut, "value_levels");
    L.G = kc.size(4) * 8 / key_bits;
    TORCH_CHECK(L.G > 0 && packed_tokens % L.G == 0, "kvpack: packed tokens must be whole key groups");
    blocks = packed_tokens / L.G;
    TORCH_CHECK(blocks <= kc.size(2) && packed_tokens <= vc.size(2), "kvpack: packed_tokens exceeds the buffers");
    L.blocks = blocks;
#ifdef KVPACK_INTEGER_PRODUCTS
    L.integer_keys = integer_products && (key_bits == 2 || key_bits == 4) && !L.key_lut && (L.G * key_bits / 8) % kLanes == 0;
    L.integer_values = integer_products && (value_bits == 2 || value_bits == 4) && !L.value_lut &&
                       (Dv * value_bits / 8) % kLanes == 0;
#endif
    L.key_codes = kc.data_ptr<uint8_t>();
    L.key_scale = ks.data_ptr<at::Half>();
    L.key_zero = kz.data_ptr<at::Half>();
    L.value_codes = vc.data_ptr<uint8_t>();
    L.value_scale = vs.data_ptr<at::Half>();
    L.value_zero = vz.data_ptr<at::Half>();
    L.kc_s0 = kc.stride(0), L.kc_s1 = kc.stride(1), L.kc_s2 = kc.stride(2);
    L.ks_s0 = ks.stride(0), L.ks_s1 = ks.stride(1), L.ks_s2 = ks.stride(2);
    L.vc_s0 = vc.stride(0), L.vc_s1 = vc.stride(1), L.vc_s2 = vc.stride(2);
    L.vs_s0 = vs.stride(0), L.vs_s1 = vs.stride(1), L.vs_s2 = vs.stride(2);
    TORCH_CHECK(ks.stride(3) == 1 && kz.strides() == ks.strides(), "kvpack: key params layout");
    TORCH_CHECK(vs.stride(3) == 1 && vz.strides() == vs.strides(), "kvpack: value params");
    TORCH_CHECK(kc.stride(4) == 1 && kc.stride(3) == kc.size(4), "kvpack: key codes layout");
    TORCH_CHECK(vc.stride(3) == 1 && vc.stride(2) == vc.size(3), "kvpack: value codes");
    TORCH_CHECK(L.G % kLanes == 0 && Dv % kLanes == 0 && value_group % 8 == 0, "kvpack: sizes must be multiples of 16");
  }
  // Work items: per (batch, kv head), chunks of packed blocks and one item of exact tokens. About kItemsPerThread
  // items per thread balance uneven chunks; a chunk spans at least kMinChunkTokens tokens, a long run of reads.
  const int threads = at::get_num_threads();
  const int chunks_per_head = std::max<int64_t>(1, (kItemsPerThread * threads + B * H - 1) / (B * H));
  const int chunk_blocks =
      blocks ? std::max({(blocks + chunks_per_head - 1) / chunks_per_head, (kMinChunkTokens + L.G - 1) / L.G, 1}) : 1;
  const int chunks = blocks > 0 ? (blocks + chunk_blocks - 1) / chunk_blocks : 0;
  const int items = chunks + 1;
  std::vector<float> part_top(static_cast<size_t>(B) * H * items * R, kNegLarge);
  std::vector<float> part_total(static_cast<size_t>(B) * H * items * R, 0.0f);
  std::vector<float> part_out(static_cast<size_t>(B) * H * items * R * Dv, 0.0f);
  at::parallel_for(0, static_cast<int64_t>(B) * H * items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t work = begin; work < end; ++work) {
      const int b = work / (H * items), h = (work / items) % H, item = work % items;
      float* top = part_top.data() + work * R;
      float* total = part_total.data() + work * R;
      float* result = part_out.data() + work * R * Dv;
      if (item < chunks) {
        packed_item(L)(L, b, h, item * chunk_blocks, std::min<int>((item + 1) * chunk_blocks, blocks), top, total,
                      result);
      } else {
        attend_exact(L, b, h, top, total, result);
      }
    }
  });
  auto out = torch::empty({B, Q, Hq, Dv}, query.options());
  float* o = out.data_ptr<float>();
  const float* rotation = packed ? matrix_or_null(value_rotation, Dv, Dv, "value_rotation") : nullptr;
  // The merge is a few vectors per head: serial below 16 heads (waking a thread costs more than it saves).
  at::parallel_for(0, static_cast<int64_t>(B) * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> packed_share(rotation ? Dv : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int r = 0; r < R; ++r) {
        float top_all = kNegLarge;
        for (int item = 0; item < items; ++item) top_all = std::max(top_all, part_top[(bh * items + item) * R + r]);
        float total_all = 0.0f;
        float* dst = o + ((b * Q + r % Q) * Hq + h * group + r / Q) * Dv;
        std::fill(dst, dst + Dv, 0.0f);
        // Packed items (all but the last) add into packed_share when their values are rotated, else into dst.
        float* packed_dst = rotation ? packed_share.data() : dst;
        std::fill(packed_share.begin(), packed_share.end(), 0.0f);
        for (int item = 0; item < items; ++item) {
          const int64_t at = (bh * items + item) * R + r;
          const float w = exp_nonpositive(part_top[at] - top_all);
          total_all += w * part_total[at];
          const float* src = part_out.data() + at * Dv;
          float* into = item < chunks ? packed_dst : dst;
          for (int c = 0; c < Dv; ++c) into[c] += w * src[c];
        }
        if (rotation)  // out += share @ R_v^T: channel c is the share's dot product with row c of R_v
          for (int c = 0; c < Dv; ++c) dst[c] += dot(packed_share.data(), rotation + static_cast<int64_t>(c) * Dv, Dv);
        if (total_all > 0.0f)
          for (int c = 0; c < Dv; ++c) dst[c] /= total_all;
      }
    }
  });
  return out;
}

// Whether this build has the integer products (integer_product: AVX-512 VNNI and VBMI), used when asked.
bool has_integer_products() {
#ifdef KVPACK_INTEGER_PRODUCTS
  return true;
#else
  return false;
#endif
}

// Which of the kernel's code paths this build compiled (for `kvpack doctor` and the tests).
std::string simd_path() {
#if defined(__AVX512F__)
  return "AVX-512 intrinsics";
#elif defined(KVPACK_AVX2)
  return "AVX2 intrinsics";
#elif defined(__ARM_NEON)
  return "NEON (compiler-vectorised loops)";
#else
  return "portable loops";
#endif
}

// How many threads at::parallel_for runs `items` items on in this build: 1 when it was compiled without OpenMP
// (ATen's parallel_for is inline; without _OPENMP it takes its serial path whatever torch's thread count).
int64_t parallel_threads(int64_t items) {
  std::vector<int64_t> seen(static_cast<size_t>(items), -1);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) seen[static_cast<size_t>(i)] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_path", &simd_path, "which SIMD code path this build of the kernel uses");
  m.def("integer_products", &has_integer_products, "whether this build has the AVX-512 VNNI integer products");
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses for this many items in this build");
  // Without the GIL: attention calls of caches used from several Python threads run at the same time.
  m.def("packed_attention", &packed_attention, "kvpack fused attention over a packed KV cache (CPU)",
        py::call_guard<py::gil_scoped_release>());
}

#ifdef KVPACK_REGISTER_OP
// The CPU kernel of the `kvpack::packed_attention` operator (defined in kvpack/attention/op.py). Only the default
// build registers it; the builds tests and benchmarks compare against it (other -march, no OpenMP) do not.
TORCH_LIBRARY_IMPL(kvpack, CPU, m) { m.impl("packed_attention", &packed_attention); }
#endif
