// Quantized matrix products for CPU decoding: int8 activations times int8 or int4 weights with AVX512-VNNI.
//
// Activations are quantized once per call to int8 with one scale per 32 inputs (llama.cpp's Q8_0).
// Weights are stored 16 output rows interleaved, so one 64-byte load holds 4 inputs of 16 rows and one
// `vpdpbusd` multiplies them by 4 broadcast activation bytes: each of the 16 lanes accumulates one row.
//   int8: codes + 128 (unsigned), layout [N/16][K/4][16][4]; scale per (row, 32 inputs), float16
//         [N/16][K/32][16]. Each block's sum is corrected by 128 * (sum of the activation block's codes).
//   int4: codes 0..15 with w = scale * code + min, layout [N/16][K/8][16][4]: byte t of a row holds input
//         8j + t (low nibble) and 8j + 4 + t (high nibble); scale and min per (row, 32 inputs), float16
//         [N/16][K/32][2][16].
// Threads split the 16-row groups (at::parallel_for, torch's intra-op threads).

#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // inputs per scale
constexpr int64_t kRows = 16;   // output rows per interleaved group
constexpr int64_t kTile = 8;    // activation rows computed together

struct QuantizedActivations {
  std::vector<int8_t> codes;   // [M][K]
  std::vector<float> scales;   // [M][K/32]
  std::vector<float> sums;     // [M][K/32]: scale * sum of codes (int4's min term)
  std::vector<int32_t> offsets;  // [M][K/32]: 128 * sum of codes (int8's unsigned-weight correction)
};

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, QuantizedActivations& q) {
  const int64_t blocks = k / kBlock;
  q.codes.resize(m * k);
  q.scales.resize(m * blocks);
  q.sums.resize(m * blocks);
  q.offsets.resize(m * blocks);
  for (int64_t i = 0; i < m * blocks; ++i) {
    const T* src = x + i * kBlock;
    float values[kBlock], amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) {
      values[j] = static_cast<float>(src[j]);
      amax = std::max(amax, std::fabs(values[j]));
    }
    const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int32_t code = static_cast<int32_t>(std::nearbyint(values[j] * inverse));
      q.codes[i * kBlock + j] = static_cast<int8_t>(code);
      sum += code;
    }
    q.scales[i] = scale;
    q.sums[i] = scale * static_cast<float>(sum);
    q.offsets[i] = 128 * sum;
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One group of 16 rows against `tile` activation rows starting at `m0`; acc[t] gets row sums.
template <bool kInt4>
void group_kernel(const uint8_t* weights, const at::Half* scales, const QuantizedActivations& q, int64_t k,
                  int64_t m0, int64_t tile, __m512* acc) {
  const int64_t blocks = k / kBlock;
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  for (int64_t t = 0; t < tile; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i w[8];
    const uint8_t* block = weights + b * kBlock * kRows / (kInt4 ? 2 : 1);
    if (kInt4) {
      for (int j = 0; j < 4; ++j) {
        const __m512i packed = _mm512_loadu_si512(block + j * 64);
        w[2 * j] = _mm512_and_si512(packed, low_mask);
        w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_mask);
      }
    } else {
      for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(block + j * 64);
    }
    const at::Half* s = scales + b * kRows * (kInt4 ? 2 : 1);
    const __m512 row_scales = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    __m512 row_mins;
    if (kInt4) row_mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kRows)));
    for (int64_t t = 0; t < tile; ++t) {
      const int64_t row = m0 + t;
      const int8_t* x = q.codes.data() + row * k + b * kBlock;
      __m512i dot = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) dot = _mm512_dpbusd_epi32(dot, w[j], broadcast4(x + 4 * j));
      if (!kInt4) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(q.offsets[row * blocks + b]));
      const __m512 scale = _mm512_mul_ps(row_scales, _mm512_set1_ps(q.scales[row * blocks + b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
      if (kInt4) acc[t] = _mm512_fmadd_ps(row_mins, _mm512_set1_ps(q.sums[row * blocks + b]), acc[t]);
    }
  }
}

template <bool kInt4>
torch::Tensor quantized_linear(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& scales,
                               const c10::optional<torch::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1), groups = weights.size(0);
  TORCH_CHECK(k % kBlock == 0, "in_features must be a multiple of 32");
  TORCH_CHECK(weights.numel() == groups * kRows * k / (kInt4 ? 2 : 1), "weights do not match in_features");
  QuantizedActivations q;
  if (x.scalar_type() == torch::kFloat) {
    quantize_rows(x.data_ptr<float>(), m, k, q);
  } else {
    quantize_rows(x.data_ptr<at::BFloat16>(), m, k, q);
  }
  auto out = torch::empty({m, out_features}, x.options().dtype(torch::kFloat));
  float* y = out.data_ptr<float>();
  const uint8_t* w = weights.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t group_bytes = kRows * k / (kInt4 ? 2 : 1), group_scales = kRows * (k / kBlock) * (kInt4 ? 2 : 1);
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    __m512 acc[kTile];
    float lanes[kRows];
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t m0 = 0; m0 < m; m0 += kTile) {
        const int64_t tile = std::min(kTile, m - m0);
        group_kernel<kInt4>(w + g * group_bytes, s + g * group_scales, q, k, m0, tile, acc);
        const int64_t rows = std::min(kRows, out_features - g * kRows);
        for (int64_t t = 0; t < tile; ++t) {
          _mm512_storeu_ps(lanes, acc[t]);
          float* dst = y + (m0 + t) * out_features + g * kRows;
          for (int64_t r = 0; r < rows; ++r) dst[r] = lanes[r] + (b ? b[g * kRows + r] : 0.f);
        }
      }
    }
  });
  return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(vlm_kernels, library) {
  library.def("int8_linear(Tensor x, Tensor weights, Tensor scales, Tensor? bias, int out_features) -> Tensor",
              &quantized_linear<false>);
  library.def("int4_linear(Tensor x, Tensor weights, Tensor scales, Tensor? bias, int out_features) -> Tensor",
              &quantized_linear<true>);
}
