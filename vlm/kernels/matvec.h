// Matrix products for a few activation rows (decoding), shared by the linear ops and the decode layer.
//
// A `Weights` is one linear's matrix in one of three formats:
//   dense: the row-major (N, K) float32 or bfloat16 weight as PyTorch holds it (each row is one dot product,
//          four rows at a time);
//   int8 / int4: 16 output rows interleaved, multiplied by int8-quantized activations:
//     int8: codes + 128 (unsigned), layout [N/16][K/4][16][4]; scale per (row, 32 inputs), float16
//           [N/16][K/32][16].
//     int4: codes 0..15 with w = scale * code + min, layout [N/16][K/8][16][4]: byte t of a row holds input
//           8j + t (low nibble) and 8j + 4 + t (high nibble); scale and min per (row, 32 inputs), float16
//           [N/16][K/32][2][16].
// Activations are quantized to int8 with one scale per 32 inputs (llama.cpp's Q8_0). `multiply` computes a
// range of 16-row groups, so callers split the groups over threads.
//
// The library is built for one instruction set, chosen per machine by vlm/kernels/__init__.py:
//   AVX512 (with VNNI): integer dot products with `vpdpbusd` (int8 codes stay unsigned, each block's sum is
//     corrected by 128 * the sum of the activation block's codes), bfloat16 rows with `vdpbf16ps` (AVX512-BF16);
//   AVX2 (with FMA and F16C): integer dot products with `vpmaddubsw`, 8 rows per vector (int8 codes made signed,
//     their magnitudes times the signed activations), bfloat16 rows widened to float32 and multiplied with FMA.
// Elementwise helpers (dequantizing, attention's dot products) use AVX2, which both have.

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

// Four int8 codes as one 32-bit word (what `vpdpbusd` / `vpmaddubsw` take broadcast).
inline int32_t four_codes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The sum of a vector's lanes.
inline float sum_lanes(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// The sums of four vectors' lanes, as one vector [sum(a), sum(b), sum(c), sum(d)].
inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128 bits: a, b, c, d
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#if defined(__AVX512F__)

inline float sum_lanes(__m512 v) { return _mm512_reduce_add_ps(v); }

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

#endif

// y[t * ldy + r] = the sum of acc[r][t]'s lanes.
template <int R, int T, typename V>
inline void store_sums(V (&acc)[R][T], float* y, int64_t ldy) {
  VLM_UNROLL for (int t = 0; t < T; ++t) {
    if constexpr (R == 4) {
      _mm_storeu_ps(y + t * ldy, sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
    } else {
      VLM_UNROLL for (int r = 0; r < R; ++r) y[t * ldy + r] = sum_lanes(acc[r][t]);
    }
  }
}

// A dense weight is read one row at a time when its rows times the activation rows they meet (m x row bytes) are
// fewer bytes than this, else four rows at a time: each row of a tile is a memory stream of its own, and short
// ones read faster as one sequential stream, while long ones against several activation rows need the four rows'
// reuse of each activation load. Two threads, bf16, read from DRAM, GB/s one row at a time vs four. AMD EPYC Zen 3
// AVX2, m = 1: 9728x896 12-17 vs 10-12, but 896x4864 13 vs 16. Zen 4 AVX512, m = 1: 896x896 26-28 vs 15-17,
// 2048x2048 23-26 vs 19-20, 2048x5632 23-30 vs 16-22, 18944x3584 26-34 vs 19-21, 8960x1536 27-34 vs 20-26, rows of
// 16 KiB and more as fast or faster four at a time (1536x8960 18-21 vs 18-23, 3584x18944 20-26 vs 21-26); m = 2-8:
// 4864x896 22-32 vs 14-22, 2048x2048 at m = 2 27-31 vs 18-23, 37888x3584 at m = 2 28-31 vs 22-26, but 2048x5632
// at m = 4 17 vs 25 and 2048x2048 at m = 8 14 vs 17. Zen 4 decode, tok/s, a bound of 16384 vs 4096 at m = 1:
// 2048x5632x6 decoder 44-67 vs 39-44, 0.5B 27-34 vs 26-28, 2B 9.2-10.8 vs 8.6-9.3 (4096 vs none: 24-25 vs 18).
#if defined(__AVX512F__)
constexpr int64_t kOneStreamBytes = 16384;
#else
constexpr int64_t kOneStreamBytes = 4096;
#endif

#if defined(__AVX512F__)

constexpr int64_t kTile = 8;       // activation rows computed together by the quantized kernel
constexpr int kDenseColumns = 4;  // activation rows per dense tile

inline __m512i broadcast4(const int8_t* p) { return _mm512_set1_epi32(four_codes(p)); }

// One group of 16 quantized rows against activation rows [m0, m0 + T): out[t * 16 + r] = row r's sum.
template <bool kInt4, int T>
void group_kernel(const uint8_t* weights, const at::Half* scales, const Activations& a, int64_t m0, float* out) {
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
  VLM_UNROLL for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * kRows, acc[t]);
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

#else  // AVX2

constexpr int64_t kTile = 4;       // activation rows computed together by the quantized kernel
constexpr int kDenseColumns = 2;  // activation rows per dense tile (16 vector registers)

inline __m256i broadcast4(const int8_t* p) { return _mm256_set1_epi32(four_codes(p)); }

// One group of 16 quantized rows (two vectors of 8) against activation rows [m0, m0 + T): out[t * 16 + r] =
// row r's sum. A block's products are summed in 16 bits where they cannot overflow (int4: 8 x 2 x 15 x 127).
template <bool kInt4, int T>
void group_kernel(const uint8_t* weights, const at::Half* scales, const Activations& a, int64_t m0, float* out) {
  const int64_t k = a.k, blocks = k / kBlock;
  const __m256i low_mask = _mm256_set1_epi8(0x0F), sign_bit = _mm256_set1_epi8(-128), ones = _mm256_set1_epi16(1);
  __m256 acc[T][2];
  VLM_UNROLL for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = weights + b * kBlock * kRows / (kInt4 ? 2 : 1);
    VLM_UNROLL for (int j = 0; j < (kInt4 ? 4 : 8); ++j) prefetch(block + 64 * j);
    const int8_t* x[T];
    VLM_UNROLL for (int t = 0; t < T; ++t) x[t] = a.codes.data() + (m0 + t) * k + b * kBlock;
    __m256i sums[T][2];
    VLM_UNROLL for (int t = 0; t < T; ++t) sums[t][0] = sums[t][1] = _mm256_setzero_si256();
    VLM_UNROLL for (int j = 0; j < (kInt4 ? 4 : 8); ++j) {
      VLM_UNROLL for (int h = 0; h < 2; ++h) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * j + 32 * h));
        if (kInt4) {
          const __m256i low = _mm256_and_si256(packed, low_mask);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
          VLM_UNROLL for (int t = 0; t < T; ++t) {
            const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(low, broadcast4(x[t] + 8 * j)),
                                                  _mm256_maddubs_epi16(high, broadcast4(x[t] + 8 * j + 4)));
            sums[t][h] = _mm256_add_epi16(sums[t][h], pair);
          }
        } else {
          const __m256i code = _mm256_xor_si256(packed, sign_bit);  // code - 128, signed
          const __m256i magnitude = _mm256_abs_epi8(code);
          VLM_UNROLL for (int t = 0; t < T; ++t) {
            const __m256i pair = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(broadcast4(x[t] + 4 * j), code));
            sums[t][h] = _mm256_add_epi32(sums[t][h], _mm256_madd_epi16(pair, ones));
          }
        }
      }
    }
    const at::Half* s = scales + b * kRows * (kInt4 ? 2 : 1);
    VLM_UNROLL for (int h = 0; h < 2; ++h) {
      const __m256 row_scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8 * h)));
      __m256 row_mins;
      if (kInt4) row_mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + kRows + 8 * h)));
      VLM_UNROLL for (int t = 0; t < T; ++t) {
        const int64_t row = m0 + t;
        const __m256i dot = kInt4 ? _mm256_madd_epi16(sums[t][h], ones) : sums[t][h];
        const __m256 scale = _mm256_mul_ps(row_scales, _mm256_set1_ps(a.scales[row * blocks + b]));
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[t][h]);
        if (kInt4) acc[t][h] = _mm256_fmadd_ps(row_mins, _mm256_set1_ps(a.sums[row * blocks + b]), acc[t][h]);
      }
    }
  }
  VLM_UNROLL for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(out + t * kRows, acc[t][0]);
    _mm256_storeu_ps(out + t * kRows + 8, acc[t][1]);
  }
}

// y[t * ldy + r] += the products of inputs [from, k), one by one (what does not fill a vector).
template <typename W, int R, int T>
inline void add_rest(const W* w, const W* x, int64_t from, int64_t k, float* y, int64_t ldy) {
  for (int64_t i = from; i < k; ++i)
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) y[t * ldy + r] += to_float(w[r * k + i]) * to_float(x[t * k + i]);
}

// bfloat16 vector -> two float32 vectors by interleaving zeros below each value: inputs 0-3, 8-11 and 4-7,
// 12-15 (weights and activations are split alike, so the products pair up).
inline __m256 bf16_low(__m256i v) { return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v)); }
inline __m256 bf16_high(__m256i v) { return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v)); }

// Dense rows [r0, r0 + R) against activation rows [m0, m0 + T): y[t][r] = dot(w[r], x[t]). A small tile sums the
// low and high halves in two chains (one chain waits on each multiply-add's latency); a large one has enough.
template <int R, int T>
void bf16_tile(const uint16_t* w, const uint16_t* x, int64_t k, float* y, int64_t ldy) {
  constexpr int kChains = R * T <= 4 ? 2 : 1;
  __m256 acc[kChains][R][T];
  VLM_UNROLL for (int c = 0; c < kChains; ++c)
    VLM_UNROLL for (int r = 0; r < R; ++r)
      VLM_UNROLL for (int t = 0; t < T; ++t) acc[c][r][t] = _mm256_setzero_ps();
  const int64_t whole = k / 16 * 16;
  for (int64_t i = 0; i < whole; i += 16) {
    __m256i wv[R];
    if (R > 1) VLM_UNROLL for (int r = 0; r < R; ++r) prefetch(w + r * k + i);
    VLM_UNROLL for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + i));
    VLM_UNROLL for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * k + i));
      const __m256 low = bf16_low(xv), high = bf16_high(xv);
      VLM_UNROLL for (int r = 0; r < R; ++r) {
        acc[0][r][t] = _mm256_fmadd_ps(bf16_low(wv[r]), low, acc[0][r][t]);
        acc[kChains - 1][r][t] = _mm256_fmadd_ps(bf16_high(wv[r]), high, acc[kChains - 1][r][t]);
      }
    }
  }
  if constexpr (kChains == 2) {
    VLM_UNROLL for (int r = 0; r < R; ++r)
      VLM_UNROLL for (int t = 0; t < T; ++t) acc[0][r][t] = _mm256_add_ps(acc[0][r][t], acc[1][r][t]);
  }
  store_sums<R, T>(acc[0], y, ldy);
  add_rest<uint16_t, R, T>(w, x, whole, k, y, ldy);
}

template <int R, int T>
void f32_tile(const float* w, const float* x, int64_t k, float* y, int64_t ldy) {
  __m256 acc[R][T];
  VLM_UNROLL for (int r = 0; r < R; ++r)
    VLM_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t whole = k / 8 * 8;
  for (int64_t i = 0; i < whole; i += 8) {
    __m256 wv[R];
    VLM_UNROLL for (int r = 0; r < R; ++r) prefetch(w + r * k + i);
    VLM_UNROLL for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * k + i);
    VLM_UNROLL for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * k + i);
      VLM_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  store_sums<R, T>(acc, y, ldy);
  add_rest<float, R, T>(w, x, whole, k, y, ldy);
}

#endif

// Calls f(std::integral_constant<int, n>) for 1 <= n <= kMax: the tile size as a compile-time constant.
template <int kMax, typename F>
void with_tile(int64_t n, const F& f) {
  if constexpr (kMax > 1) {
    if (n < kMax) return with_tile<kMax - 1>(n, f);
  }
  f(std::integral_constant<int, kMax>{});
}

template <bool kInt4>
void quantized_groups(const uint8_t* w, const at::Half* s, const Activations& a, int64_t g0, int64_t g1,
                      int64_t n, float* y, int64_t ldy) {
  const int64_t k = a.k, group_bytes = kRows * k / (kInt4 ? 2 : 1);
  const int64_t group_scales = kRows * (k / kBlock) * (kInt4 ? 2 : 1);
  float lanes[kTile * kRows];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rows = std::min(kRows, n - g * kRows);
    for (int64_t m0 = 0; m0 < a.m; m0 += kTile) {
      const int64_t tile = std::min(kTile, a.m - m0);
      with_tile<kTile>(tile, [&](auto t) {
        group_kernel<kInt4, decltype(t)::value>(w + g * group_bytes, s + g * group_scales, a, m0, lanes);
      });
      for (int64_t t = 0; t < tile; ++t) std::memcpy(y + (m0 + t) * ldy + g * kRows, lanes + t * kRows, rows * sizeof(float));
    }
  }
}


// Rows [n0, n1) of a dense weight against every activation row: 4 rows (or 1, see kOneStreamBytes) x up to
// kDenseColumns activation rows per tile.
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
  const bool one_stream = m * k * static_cast<int64_t>(sizeof(W)) < kOneStreamBytes;
  auto rows = [&](auto count, int64_t r) {
    int64_t t = 0;
    for (; t + kDenseColumns <= m; t += kDenseColumns) tile(count, std::integral_constant<int, kDenseColumns>{}, r, t);
    if (t < m) with_tile<kDenseColumns>(m - t, [&](auto cols) { tile(count, cols, r, t); });
  };
  int64_t r = n0;
  for (; !one_stream && r + R <= n1; r += R) rows(Four{}, r);
  for (; r < n1; ++r) rows(One{}, r);
}

inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

inline void store8(at::BFloat16* dst, __m256 v) {  // rounded to nearest even, as PyTorch rounds
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
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
          const __m256 scale = _mm256_set1_ps(static_cast<float>(s[r]));
          const __m256 offset = _mm256_set1_ps(int4 ? static_cast<float>(s[kRows + r]) : 0.f);
          T* dst = out + (g * kRows + r) * k + b * kBlock;
          VLM_UNROLL for (int part = 0; part < 4; ++part) {
            __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                reinterpret_cast<const __m128i*>(row + 8 * part))));
            if (!int4) code = _mm256_sub_ps(code, _mm256_set1_ps(128.f));
            const __m256 value = int4 ? _mm256_fmadd_ps(code, scale, offset) : _mm256_mul_ps(code, scale);
            store8(dst + 8 * part, value);
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
