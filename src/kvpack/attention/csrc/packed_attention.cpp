// kvpack's fused CPU attention over a packed KV cache (KIVI layout), built at first use with torch's extension
// tooling and -march=native (see kvpack/attention/cpu.py).
//
// Inputs (one layer; B batch, H kv heads, R query rows per kv head = query heads per kv head x new tokens):
//   q            float32 [B, H, R, D], already multiplied by the softmax scaling
//   row_query    int64 [R]: the new token (mask row) of each query row
//   key_codes    uint8 [B, H, >=NB, D, G*KB/8]: per channel, G consecutive tokens per row
//   key_scale/zero  float16 [B, H, >=NB, D]
//   value_codes  uint8 [B, H, >=P, Dv*VB/8]: per token, one row of Dv codes
//   value_scale/zero float16 [B, H, >=P, Dv/VG]
//   blocks       NB (P = NB * G packed tokens; the tensors may be views with more capacity along dim 2)
//   exact_keys/values float32 [B, H, E, D / Dv]: sinks (the first sink_len), then residual and new tokens
//   bias         float32 [B, Q, total tokens] additive, or an empty tensor
// Output: float32 [B, H, R, Dv].
//
// Every (batch, kv head) is split into chunks of packed blocks plus one item for the exact tokens; items run in
// parallel (torch's thread pool), each keeping a running max / sum / weighted value sum per row (online softmax);
// the items of one head are merged by their log-sum-exp. Within a block, codes are first unpacked (and value
// scales folded in) into small float tiles in L1, then multiplied with register-blocked loops of 16 lanes that
// the compiler vectorises for the machine (AVX-512, AVX2, NEON).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kNegLarge = -1.0e30f;  // running maxima start here: a fully masked row ends as 0 / 0 -> 0
constexpr int kLanes = 16;             // the width of the register tiles
constexpr int kRowTile = 4;            // query rows per register tile

// exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * p(r), |relative error| < 2e-7.
// Below -87.3 (or -inf: a masked score) it is exactly 0.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// Codes of one packed row (little-endian bit stream) as floats, in order.
template <int BITS>
inline void unpack_row(const uint8_t* __restrict row, int n, float* __restrict out) {
  if constexpr (BITS == 8) {
    for (int i = 0; i < n; ++i) out[i] = static_cast<float>(row[i]);
  } else if constexpr (BITS == 4) {
    for (int j = 0; j < n / 2; ++j) {
      out[2 * j] = static_cast<float>(row[j] & 15);
      out[2 * j + 1] = static_cast<float>(row[j] >> 4);
    }
  } else if constexpr (BITS == 2) {
    for (int j = 0; j < n / 4; ++j) {
      const uint8_t b = row[j];
      out[4 * j] = static_cast<float>(b & 3);
      out[4 * j + 1] = static_cast<float>((b >> 2) & 3);
      out[4 * j + 2] = static_cast<float>((b >> 4) & 3);
      out[4 * j + 3] = static_cast<float>(b >> 6);
    }
  } else {  // 3 bits: 8 codes in every 3 bytes (n is a multiple of 8: groups and head dims are multiples of 16)
    for (int j = 0; j < n / 8; ++j) {
      const uint32_t w = row[3 * j] | (row[3 * j + 1] << 8) | (row[3 * j + 2] << 16);
      for (int i = 0; i < 8; ++i) out[8 * j + i] = static_cast<float>((w >> (3 * i)) & 7);
    }
  }
}

// out[r][n] (+)= sum_k a[r][k] * b[k][n] for RT rows: a [RT][K] (stride lda), b [K][N] (stride ldb), N % 16 == 0.
template <int RT>
inline void small_gemm(const float* __restrict a, int lda, const float* __restrict b, int ldb, int K, int N,
                       float* __restrict out, int ldo, bool accumulate) {
  for (int n0 = 0; n0 < N; n0 += kLanes) {
    float acc[RT][kLanes];
    for (int r = 0; r < RT; ++r)
      for (int l = 0; l < kLanes; ++l) acc[r][l] = accumulate ? out[r * ldo + n0 + l] : 0.0f;
    for (int k = 0; k < K; ++k) {
      const float* __restrict bk = b + k * ldb + n0;
      for (int r = 0; r < RT; ++r) {
        const float ak = a[r * lda + k];
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[r][l] += ak * bk[l];
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int l = 0; l < kLanes; ++l) out[r * ldo + n0 + l] = acc[r][l];
  }
}

void gemm_rows(const float* a, int lda, const float* b, int ldb, int R, int K, int N, float* out, int ldo,
               bool accumulate) {
  int r = 0;
  for (; r + 4 <= R; r += 4) small_gemm<4>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate);
  switch (R - r) {
    case 3: small_gemm<3>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate); break;
    case 2: small_gemm<2>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate); break;
    case 1: small_gemm<1>(a + r * lda, lda, b, ldb, K, N, out + r * ldo, ldo, accumulate); break;
    default: break;
  }
}

struct Layer {
  const float* q;
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
  int H, R, D, Dv, G, VG, key_row_bytes, blocks, n_exact, sink_len, key_bits, value_bits;
};

// One item: online softmax over packed blocks [first, last) of (b, h); writes max, sum and weighted sums.
// A block's rows are whole bytes with no padding bits (G and Dv are multiples of 16), and they lie contiguously
// (channel rows of a key block; token rows of the block's values), so each is unpacked in one pass.
template <int KB, int VB>
void attend_packed(const Layer& L, int b, int h, int first, int last, float* top, float* total, float* result) {
  const int R = L.R, D = L.D, Dv = L.Dv, G = L.G, VG = L.VG, n_groups = Dv / VG;
  std::vector<float> key_tile(D * G), qs(R * D), scores(R * G), value_tile(G * Dv), zero_acc(R * n_groups, 0.0f),
      base(R), weights_t(G * R);
  std::vector<float> vzero(G * n_groups);
  const float* q = L.q + (static_cast<int64_t>(b) * L.H + h) * R * D;
  for (int block = first; block < last; ++block) {
    const uint8_t* codes = L.key_codes + b * L.kc_s0 + h * L.kc_s1 + block * L.kc_s2;
    const at::Half* kscale = L.key_scale + b * L.ks_s0 + h * L.ks_s1 + block * L.ks_s2;
    const at::Half* kzero = L.key_zero + b * L.ks_s0 + h * L.ks_s1 + block * L.ks_s2;
    unpack_row<KB>(codes, D * G, key_tile.data());
    // Scores: (q * scale) . codes + q . zero.
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float qd = q[r * D + d];
        qs[r * D + d] = qd * static_cast<float>(kscale[d]);
        acc += qd * static_cast<float>(kzero[d]);
      }
      base[r] = acc;
    }
    gemm_rows(qs.data(), D, key_tile.data(), G, R, D, G, scores.data(), G, false);
    // Values of the block, dequantized but for the zero points (their share is summed apart, per group).
    const int64_t token0 = static_cast<int64_t>(block) * G;
    unpack_row<VB>(L.value_codes + b * L.vc_s0 + h * L.vc_s1 + token0 * L.vc_s2, G * Dv, value_tile.data());
    for (int t = 0; t < G; ++t) {
      const int64_t token = token0 + t;
      const at::Half* vscale = L.value_scale + b * L.vs_s0 + h * L.vs_s1 + token * L.vs_s2;
      const at::Half* vz = L.value_zero + b * L.vs_s0 + h * L.vs_s1 + token * L.vs_s2;
      float* tile = value_tile.data() + t * Dv;
      for (int g = 0; g < n_groups; ++g) {
        const float s = static_cast<float>(vscale[g]);
        vzero[t * n_groups + g] = static_cast<float>(vz[g]);
#pragma omp simd
        for (int c = g * VG; c < (g + 1) * VG; ++c) tile[c] *= s;
      }
    }
    for (int r = 0; r < R; ++r) {
      float* s = scores.data() + r * G;
      const float* bias_row = L.bias ? L.bias + b * L.bias_s0 + L.row_query[r] * L.bias_s1 + L.sink_len + token0 : nullptr;
      float block_top = top[r];
      for (int t = 0; t < G; ++t) {
        s[t] += base[r] + (bias_row ? bias_row[t] : 0.0f);
        block_top = std::max(block_top, s[t]);
      }
      const float correction = exp_nonpositive(top[r] - block_top);
      top[r] = block_top;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int t = 0; t < G; ++t) {
        s[t] = exp_nonpositive(s[t] - block_top);
        sum += s[t];
      }
      total[r] = total[r] * correction + sum;
      for (int c = 0; c < Dv; ++c) result[r * Dv + c] *= correction;
      for (int g = 0; g < n_groups; ++g) {
        float z = zero_acc[r * n_groups + g] * correction;
        for (int t = 0; t < G; ++t) z += s[t] * vzero[t * n_groups + g];
        zero_acc[r * n_groups + g] = z;
      }
    }
    gemm_rows(scores.data(), G, value_tile.data(), Dv, R, G, Dv, result, Dv, true);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < Dv; ++c) result[r * Dv + c] += zero_acc[r * n_groups + c / VG];
}

// The item of the exact tokens (sinks, residual, new): the same online softmax over float32 keys and values.
void attend_exact(const Layer& L, int b, int h, float* top, float* total, float* result) {
  const int R = L.R, D = L.D, Dv = L.Dv, packed = L.blocks * L.G;
  const float* q = L.q + (static_cast<int64_t>(b) * L.H + h) * R * D;
  for (int e = 0; e < L.n_exact; ++e) {
    const float* k = L.exact_keys + b * L.ek_s0 + h * L.ek_s1 + e * L.ek_s2;
    const float* v = L.exact_values + b * L.ev_s0 + h * L.ev_s1 + e * L.ev_s2;
    const int64_t token = e < L.sink_len ? e : e + packed;
    for (int r = 0; r < R; ++r) {
      float score = 0.0f;
#pragma omp simd reduction(+ : score)
      for (int d = 0; d < D; ++d) score += q[r * D + d] * k[d];
      if (L.bias) score += L.bias[b * L.bias_s0 + L.row_query[r] * L.bias_s1 + token];
      if (score > top[r]) {
        const float correction = exp_nonpositive(top[r] - score);
        total[r] *= correction;
        for (int c = 0; c < Dv; ++c) result[r * Dv + c] *= correction;
        top[r] = score;
      }
      const float w = exp_nonpositive(score - top[r]);
      total[r] += w;
#pragma omp simd
      for (int c = 0; c < Dv; ++c) result[r * Dv + c] += w * v[c];
    }
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

torch::Tensor packed_attention(torch::Tensor q, torch::Tensor row_query, torch::Tensor key_codes,
                               torch::Tensor key_scale, torch::Tensor key_zero, torch::Tensor value_codes,
                               torch::Tensor value_scale, torch::Tensor value_zero, int64_t blocks,
                               torch::Tensor exact_keys, torch::Tensor exact_values, torch::Tensor bias,
                               int64_t sink_len, int64_t key_bits, int64_t value_bits, int64_t value_group,
                               int64_t chunk_blocks) {
  TORCH_CHECK(q.is_contiguous() && q.dtype() == torch::kFloat32, "kvpack: q must be contiguous float32");
  TORCH_CHECK(exact_keys.stride(3) == 1 && exact_values.stride(3) == 1, "kvpack: exact rows must be contiguous");
  const int B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), Dv = exact_values.size(3);
  Layer L{};
  L.q = q.data_ptr<float>();
  L.row_query = row_query.data_ptr<int64_t>();
  L.exact_keys = exact_keys.data_ptr<float>();
  L.exact_values = exact_values.data_ptr<float>();
  L.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  L.bias_s0 = bias.numel() ? bias.stride(0) : 0;
  L.bias_s1 = bias.numel() ? bias.stride(1) : 0;
  L.ek_s0 = exact_keys.stride(0), L.ek_s1 = exact_keys.stride(1), L.ek_s2 = exact_keys.stride(2);
  L.ev_s0 = exact_values.stride(0), L.ev_s1 = exact_values.stride(1), L.ev_s2 = exact_values.stride(2);
  L.H = H, L.R = R, L.D = D, L.Dv = Dv, L.blocks = blocks, L.n_exact = exact_keys.size(2), L.sink_len = sink_len;
  L.key_bits = key_bits, L.value_bits = value_bits, L.VG = value_group;
  if (blocks > 0) {
    L.key_codes = key_codes.data_ptr<uint8_t>();
    L.key_scale = key_scale.data_ptr<at::Half>();
    L.key_zero = key_zero.data_ptr<at::Half>();
    L.value_codes = value_codes.data_ptr<uint8_t>();
    L.value_scale = value_scale.data_ptr<at::Half>();
    L.value_zero = value_zero.data_ptr<at::Half>();
    L.key_row_bytes = key_codes.size(4);
    L.G = key_codes.size(4) * 8 / key_bits;
    L.kc_s0 = key_codes.stride(0), L.kc_s1 = key_codes.stride(1), L.kc_s2 = key_codes.stride(2);
    L.ks_s0 = key_scale.stride(0), L.ks_s1 = key_scale.stride(1), L.ks_s2 = key_scale.stride(2);
    L.vc_s0 = value_codes.stride(0), L.vc_s1 = value_codes.stride(1), L.vc_s2 = value_codes.stride(2);
    L.vs_s0 = value_scale.stride(0), L.vs_s1 = value_scale.stride(1), L.vs_s2 = value_scale.stride(2);
    TORCH_CHECK(key_scale.stride(3) == 1 && key_zero.strides() == key_scale.strides(), "kvpack: key params layout");
    TORCH_CHECK(value_scale.stride(3) == 1 && value_zero.strides() == value_scale.strides(), "kvpack: value params");
    TORCH_CHECK(key_codes.stride(4) == 1 && key_codes.stride(3) == L.key_row_bytes, "kvpack: key codes layout");
    TORCH_CHECK(value_codes.stride(3) == 1 && value_codes.stride(2) == value_codes.size(3), "kvpack: value codes");
    TORCH_CHECK(L.G % kLanes == 0 && Dv % kLanes == 0 && value_group % 8 == 0, "kvpack: sizes must be multiples of 16");
  }
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
  auto out = torch::empty({B, H, R, Dv}, q.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(B) * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int r = 0; r < R; ++r) {
        float top_all = kNegLarge;
        for (int item = 0; item < items; ++item) top_all = std::max(top_all, part_top[(bh * items + item) * R + r]);
        float total_all = 0.0f;
        float* dst = o + (bh * R + r) * Dv;
        std::fill(dst, dst + Dv, 0.0f);
        for (int item = 0; item < items; ++item) {
          const int64_t at = (bh * items + item) * R + r;
          const float w = exp_nonpositive(part_top[at] - top_all);
          total_all += w * part_total[at];
          const float* src = part_out.data() + at * Dv;
          for (int c = 0; c < Dv; ++c) dst[c] += w * src[c];
        }
        if (total_all > 0.0f)
          for (int c = 0; c < Dv; ++c) dst[c] /= total_all;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_attention", &packed_attention, "kvpack fused attention over a packed KV cache (CPU)");
}
