// Matrix products for a few activation rows (decoding), shared by the linear ops and the decode layer.
//
// A `Weights` is one linear's matrix in one of three formats:
//   dense: the row-major (N, K) float32 or bfloat16 weight as PyTorch holds it (bfloat16 rows are multiplied
//          with `vdpbf16ps`, float32 rows with FMA; each row is one dot product, four rows at a time);
//   int8 / int4: 16 output rows interleaved, int8-quantized activations multiplied with `vpdpbusd`:
//     int8: codes + 128 (unsigned), layout [N/16][K/4][16][4]; scale per (row, 32 inputs), float16
//           [N/16][K/32][16]. Each block's sum is corrected by 128 * (sum of the activation block's codes).
//     int4: codes 0..15 with w = scale * code + min, layout [N/16][K/8][16][4]: byte t of a row holds input
//           8j + t (low nibble) and 8j + 4 + t (high nibble); scale and min per (row, 32 inputs), float16
//           [N/16][K/32][2][16].
// Activations are quantized to int8 with one scale per 32 inputs (llama.cpp's Q8_0). `multiply` computes a
// range of 16-row groups, so callers split the groups over threads.

#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Fully unrolls a loop over a compile-time count, so arrays of vectors stay in registers (GCC keeps them on
// the stack otherwise).
#define VLM_UNROLL _Pragma("GCC unroll 16")

namespace vlm {

constexpr int64_t kBlock = 32;  // inputs per scale
constexpr int64_t kRows = 16;   // output rows per group (interleaved in the quantized formats)
constexpr int64_t kTile = 8;    // activation rows computed together by the quantized kernel
// Bytes prefetched ahead of each weight stream (hardware prefetchers stop at 4 KiB page boundaries): one core
// read 12.4 -> 14.3 GB/s (int8) and 13.2 -> 14.5 GB/s (bf16) with it, of 16.1 for plain loads.
constexpr int64_t kAhead = 2048;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kAhead, _MM_HINT_T0); }

enum class Format : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2 };

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

inline uint16_t float_to_bf16(float value) {  // round to nearest even, as PyTorch does
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (std::isnan(value)) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline float round_to(float value, bool bf16) { return bf16 ? bf16_to_float(float_to_bf16(value)) : value; }

// Activation rows prepared for one format: bfloat16 or float32 values (dense), or int8 codes (quantized).
struct Activations {
  int64_t m = 0, k = 0;
  std::vector<uint16_t> bf16;   // [M][K] (dense bfloat16 weights)
  const float* f32 = nullptr;   // [M][K] (dense float32 weights)
  std::vector<int8_t> codes;    // [M][K]
  std::vector<float> scales;    // [M][K/32]
  std::vector<float> sums;      // [M][K/32]: scale * sum of codes (int4's min term)
  std::vector<int32_t> offsets; // [M][K/32]: 128 * sum of codes (int8's unsigned-weight correction)
};

template <typename T>
inline float to_float(T value) { return static_cast<float>(value); }
template <>
inline float to_float(uint16_t bits) { return bf16_to_float(bits); }

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, Activations& a) {
  const int64_t blocks = k / kBlock;
  a.m = m, a.k = k;
  a.codes.resize(m * k);
  a.scales.resize(m * blocks);
  a.sums.resize(m * blocks);
  a.offsets.resize(m * blocks);
  for (int64_t i = 0; i < m * blocks; ++i) {
    const T* src = x + i * kBlock;
    float values[kBlock], amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) {
      values[j] = to_float(src[j]);
      amax = std::max(amax, std::fabs(values[j]));
    }
    const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int32_t code = static_cast<int32_t>(std::nearbyint(values[j] * inverse));
      a.codes[i * kBlock + j] = static_cast<int8_t>(code);
      sum += code;
    }
    a.scales[i] = scale;
    a.sums[i] = scale * static_cast<float>(sum);
    a.offsets[i] = 128 * sum;
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One group of 16 quantized rows against activation rows [m0, m0 + T); acc[t] gets row sums.
template <bool kInt4, int T>
void group_kernel(const uint8_t* weights, const at::Half* scales, const Activations& a, int64_t m0, __m512* out) {
  const int64_t k = a.k, blocks = k / kBlock;
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  VLM_UNROLL for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i w[8];
    const uint8_t* block = weights + b * kBlock * kRows / (kInt4 ? 2 : 1);
    VLM_UNROLL for (int j = 0; j < (kInt4 ? 4 : 8); ++j) prefetch(block + 64 * j);
    if (kInt4) {
      VLM_UNROLL for (int j = 0; j < 4; ++j) {
        const __m512i packed = _mm512_loadu_si512(block + j * 64);
        w[2 * j] = _mm512_and_si512(packed, low_mask);
        w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_mask);
      }
    } else {
      VLM_UNROLL for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(block + j * 64);
    }
    const at::Half* s = scales + b * kRows * (kInt4 ? 2 : 1);
    const __m512 row_scales = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    __m512 row_mins;
    if (kInt4) row_mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kRows)));
    VLM_UNROLL for (int t = 0; t < T; ++t) {
      const int64_t row = m0 + t;
      const int8_t* x = a.codes.data() + row * k + b * kBlock;
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();  // two chains of dependent sums
      VLM_UNROLL for (int j = 0; j < 4; ++j) {
        even = _mm512_dpbusd_epi32(even, w[2 * j], broadcast4(x + 8 * j));
        odd = _mm512_dpbusd_epi32(odd, w[2 * j + 1], broadcast4(x + 8 * j + 4));
      }
      __m512i dot = _mm512_add_epi32(even, odd);
      if (!kInt4) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(a.offsets[row * blocks + b]));
      const __m512 scale = _mm512_mul_ps(row_scales, _mm512_set1_ps(a.scales[row * blocks + b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
      if (kInt4) acc[t] = _mm512_fmadd_ps(row_mins, _mm512_set1_ps(a.sums[row * blocks + b]), acc[t]);
    }
  }
  VLM_UNROLL for (int t = 0; t < T; ++t) out[t] = acc[t];
}

// Calls f(std::integral_constant<int, t>) for t = n (1 <= n <= 8): the tile size as a compile-time constant.
template <typename F>
void with_tile(int64_t n, const F& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

template <bool kInt4>
void quantized_groups(const uint8_t* w, const at::Half* s, const Activations& a, int64_t g0, int64_t g1,
                      int64_t n, float* y, int64_t ldy) {
  const int64_t k = a.k, group_bytes = kRows * k / (kInt4 ? 2 : 1);
  const int64_t group_scales = kRows * (k / kBlock) * (kInt4 ? 2 : 1);
  __m512 acc[kTile];
  float lanes[kRows];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rows = std::min(kRows, n - g * kRows);
    for (int64_t m0 = 0; m0 < a.m; m0 += kTile) {
      const int64_t tile = std::min(kTile, a.m - m0);
      with_tile(tile, [&](auto t) {
        group_kernel<kInt4, decltype(t)::value>(w + g * group_bytes, s + g * group_scales, a, m0, acc);
      });
      for (int64_t t = 0; t < tile; ++t) {
        _mm512_storeu_ps(lanes, acc[t]);
        std::memcpy(y + (m0 + t) * ldy + g * kRows, lanes, rows * sizeof(float));
      }
    }
  }
}

// The sums of four vectors' lanes, as one vector [sum(a), sum(b), sum(c), sum(d)] (13 instructions where four
// _mm512_reduce_add_ps take 32: at 896 inputs a row's dot product is only 28 multiply-adds).
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128 bits: a, b, a, b
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // per 128 bits: a, b, c, d
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), high);
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// y[t * ldy + r] = the sum of acc[r][t]'s lanes.
template <int R, int T>
inline void store_sums(__m512 (&acc)[R][T], float* y, int64_t ldy) {
  VLM_UNROLL for (int t = 0; t < T; ++t) {
    if constexpr (R == 4) {
      _mm_storeu_ps(y + t * ldy, sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
    } else {
      VLM_UNROLL for (int r = 0; r < R; ++r) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
    }
  }
}

// Dense rows [r0, r0 + R) against activation rows [m0, m0 + T): y[t][r] = dot(w[r], x[t]).
template <int R, int T>
__attribute__((target("avx512bf16"))) void bf16_tile(const uint16_t* w, const uint16_t* x, int64_t k, float* y,
                                                     int64_t ldy) {
  __m512 acc[R][T];
  VLM_UNROLL for (int r = 0; r < R; ++r)
    VLM_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    const __mmask32 mask = k - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (k - i)) - 1;
    __m512bh wv[R];
    VLM_UNROLL for (int r = 0; r < R; ++r) prefetch(w + r * k + i);
    VLM_UNROLL for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * k + i);
    VLM_UNROLL for (int t = 0; t < T; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * k + i);
      VLM_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  store_sums<R, T>(acc, y, ldy);
}

template <int R, int T>
void f32_tile(const float* w, const float* x, int64_t k, float* y, int64_t ldy) {
  __m512 acc[R][T];
  VLM_UNROLL for (int r = 0; r < R; ++r)
    VLM_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = k - i >= 16 ? ~__mmask16(0) : (__mmask16(1) << (k - i)) - 1;
    __m512 wv[R];
    VLM_UNROLL for (int r = 0; r < R; ++r) prefetch(w + r * k + i);
    VLM_UNROLL for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * k + i);
    VLM_UNROLL for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * k + i);
      VLM_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  store_sums<R, T>(acc, y, ldy);
}

// Rows [n0, n1) of a dense weight against every activation row: 4 rows x up to 4 activation rows per tile.
template <typename W>
void dense_rows(const W* w, const W* x, int64_t m, int64_t k, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int R = 4;
  auto tile = [&](auto rows, auto cols, int64_t r, int64_t t) {
    constexpr int kR = decltype(rows)::value, kT = decltype(cols)::value;
    if constexpr (std::is_same_v<W, float>) {
      f32_tile<kR, kT>(w + r * k, x + t * k, k, y + t * ldy + r, ldy);
    } else {
      bf16_tile<kR, kT>(w + r * k, x + t * k, k, y + t * ldy + r, ldy);
    }
  };
  using One = std::integral_constant<int, 1>;
  using Four = std::integral_constant<int, R>;
  int64_t r = n0;
  for (; r + R <= n1; r += R) {
    int64_t t = 0;
    for (; t + 4 <= m; t += 4) tile(Four{}, std::integral_constant<int, 4>{}, r, t);
    switch (m - t) {
      case 3: tile(Four{}, std::integral_constant<int, 3>{}, r, t); break;
      case 2: tile(Four{}, std::integral_constant<int, 2>{}, r, t); break;
      case 1: tile(Four{}, One{}, r, t); break;
      default: break;
    }
  }
  for (; r < n1; ++r)
    for (int64_t t = 0; t < m; ++t) tile(One{}, One{}, r, t);
}

inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(at::BFloat16* dst, __m512 v) {  // rounded to nearest even, as PyTorch rounds
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
}

// One linear's weights (see the top of this file) and its bias (held in float32).
struct Weights {
  Format format = Format::kDense;
  torch::Tensor data, scales, bias;
  int64_t out_features = 0, in_features = 0;

  Weights() = default;
  Weights(Format format, torch::Tensor data, torch::Tensor scales, torch::Tensor bias, int64_t out_features)
      : format(format), data(std::move(data)), scales(std::move(scales)),
        bias(bias.defined() ? bias.to(torch::kFloat).contiguous() : bias), out_features(out_features) {
    const int64_t groups = this->data.size(0);
    in_features = format == Format::kDense ? this->data.size(1)
                  : format == Format::kInt8 ? this->data.numel() / (groups * kRows)
                                            : this->data.numel() * 2 / (groups * kRows);
    TORCH_CHECK(this->data.is_contiguous(), "weights must be contiguous");
    TORCH_CHECK(format == Format::kDense || in_features % kBlock == 0, "in_features must be a multiple of 32");
  }

  bool bf16() const { return format == Format::kDense && data.scalar_type() == torch::kBFloat16; }
  int64_t groups() const { return (out_features + kRows - 1) / kRows; }

  // Rows [g0 * 16, g1 * 16) of the quantized weight as float32 or bfloat16 values (out: N x K, row-major),
  // each value as the Python reference computes it: (code - 128) * scale, or code * scale + min, in float32.
  template <typename T>
  void dequantize(int64_t g0, int64_t g1, T* out) const {
    const bool int4 = format == Format::kInt4;
    const int64_t k = in_features, blocks = k / kBlock, block_bytes = kBlock * kRows / (int4 ? 2 : 1);
    const uint8_t* codes = data.data_ptr<uint8_t>();
    const at::Half* all_scales = scales.data_ptr<at::Half>();
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rows = std::min(kRows, out_features - g * kRows);
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = codes + (g * blocks + b) * block_bytes;
        const at::Half* s = all_scales + (g * blocks + b) * kRows * (int4 ? 2 : 1);
        for (int64_t r = 0; r < rows; ++r) {
          uint8_t row[kBlock];  // row r's 32 codes in input order
          for (int64_t j = 0; j < kBlock / 4; ++j) {  // int8: 4 inputs per 4 bytes; int4: 8 inputs
            if (int4 && j % 2) continue;
            const uint8_t* word = block + ((int4 ? j / 2 : j) * kRows + r) * 4;
            for (int64_t t = 0; t < 4; ++t) {
              if (int4) {
                row[4 * j + t] = word[t] & 15, row[4 * j + 4 + t] = word[t] >> 4;
              } else {
                row[4 * j + t] = word[t];
              }
            }
          }
          const __m512 scale = _mm512_set1_ps(static_cast<float>(s[r]));
          const __m512 offset = int4 ? _mm512_set1_ps(static_cast<float>(s[kRows + r])) : _mm512_set1_ps(0.f);
          T* dst = out + (g * kRows + r) * k + b * kBlock;
          VLM_UNROLL for (int half = 0; half < 2; ++half) {
            __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                reinterpret_cast<const __m128i*>(row + 16 * half))));
            if (!int4) code = _mm512_sub_ps(code, _mm512_set1_ps(128.f));
            const __m512 value = int4 ? _mm512_fmadd_ps(code, scale, offset) : _mm512_mul_ps(code, scale);
            store16(dst + 16 * half, value);
          }
        }
      }
    }
  }

  // Activations for this format from float32 rows x (M, K).
  void prepare(const float* x, int64_t m, Activations& a) const {
    a.m = m, a.k = in_features;
    if (format == Format::kDense) {
      if (bf16()) {
        a.bf16.resize(m * in_features);
        for (int64_t i = 0; i < m * in_features; ++i) a.bf16[i] = float_to_bf16(x[i]);
      } else {
        a.f32 = x;
      }
    } else {
      quantize_rows(x, m, in_features, a);
    }
  }

  // y[t][g * 16 + r] for the groups [g0, g1) (output rows past out_features excluded), bias included.
  void multiply(const Activations& a, int64_t g0, int64_t g1, float* y, int64_t ldy) const {
    const int64_t n0 = g0 * kRows, n1 = std::min(out_features, g1 * kRows);
    if (format == Format::kDense && bf16()) {
      dense_rows(reinterpret_cast<const uint16_t*>(data.data_ptr<at::BFloat16>()), a.bf16.data(), a.m, a.k, n0, n1, y,
                 ldy);
    } else if (format == Format::kDense) {
      dense_rows(data.data_ptr<float>(), a.f32, a.m, a.k, n0, n1, y, ldy);
    } else {
      const uint8_t* w = data.data_ptr<uint8_t>();
      const at::Half* s = scales.data_ptr<at::Half>();
      if (format == Format::kInt8) {
        quantized_groups<false>(w, s, a, g0, g1, out_features, y, ldy);
      } else {
        quantized_groups<true>(w, s, a, g0, g1, out_features, y, ldy);
      }
    }
    if (bias.defined()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t t = 0; t < a.m; ++t)
        for (int64_t r = n0; r < n1; ++r) y[t * ldy + r] += b[r];
    }
  }
};

}  // namespace vlm
