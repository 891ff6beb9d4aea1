// Linear layers for a few input rows (decoding): y = x W^T + b with the kernels of matvec.h, the 16-row
// groups split over torch's intra-op threads (at::parallel_for) when `parallel`, else on the calling thread.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "matvec.h"

namespace {

using vlm::Activations;
using vlm::Format;
using vlm::Weights;

torch::Tensor run(const Weights& weights, const torch::Tensor& x, bool parallel) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.size(1) == weights.in_features, "x has ", x.size(1), " features, the weights ", weights.in_features);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == torch::kFloat, "x must be float32 or bfloat16");
  const int64_t m = x.size(0);
  Activations a;
  a.m = m, a.k = weights.in_features;
  torch::Tensor x32;
  if (weights.format != Format::kDense) {
    if (bf16) {
      vlm::quantize_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), m, a.k, a);
    } else {
      vlm::quantize_rows(x.data_ptr<float>(), m, a.k, a);
    }
  } else if (weights.bf16()) {
    TORCH_CHECK(bf16, "bfloat16 weights take bfloat16 inputs");
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    a.bf16.assign(src, src + m * a.k);
  } else {
    TORCH_CHECK(!bf16, "float32 weights take float32 inputs");
    a.f32 = x.data_ptr<float>();
  }
  auto out = torch::empty({m, weights.out_features}, x.options().dtype(torch::kFloat));
  float* y = out.data_ptr<float>();
  auto body = [&](int64_t begin, int64_t end) { weights.multiply(a, begin, end, y, weights.out_features); };
  if (parallel) {
    at::parallel_for(0, weights.groups(), 1, body);
  } else {
    body(0, weights.groups());
  }
  return bf16 ? out.to(torch::kBFloat16) : out;
}

torch::Tensor bias_or_none(const c10::optional<torch::Tensor>& bias) {
  return bias.has_value() ? *bias : torch::Tensor();
}

template <Format kFormat>
torch::Tensor quantized_linear(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& scales,
                               const c10::optional<torch::Tensor>& bias, int64_t out_features, bool parallel) {
  return run(Weights(kFormat, weights, scales, bias_or_none(bias), out_features), x, parallel);
}

torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& weight,
                           const c10::optional<torch::Tensor>& bias, bool parallel) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == x.scalar_type(), "weight must be (N, K) of x's dtype");
  return run(Weights(Format::kDense, weight, {}, bias_or_none(bias), weight.size(0)), x, parallel);
}

// The quantized weight as a dense (out_features, K) matrix of `dtype` (float32 or bfloat16), for long inputs.
template <Format kFormat>
torch::Tensor dequantize(const torch::Tensor& weights, const torch::Tensor& scales, int64_t out_features,
                         at::ScalarType dtype) {
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize to float32 or bfloat16");
  const Weights w(kFormat, weights, scales, torch::Tensor(), out_features);
  auto out = torch::empty({out_features, w.in_features}, weights.options().dtype(dtype));
  at::parallel_for(0, w.groups(), 1, [&](int64_t g0, int64_t g1) {
    if (dtype == torch::kFloat) {
      w.dequantize(g0, g1, out.data_ptr<float>());
    } else {
      w.dequantize(g0, g1, out.data_ptr<at::BFloat16>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlm_kernels, library) {
#define VLM_QUANTIZED_ARGS "(Tensor x, Tensor weights, Tensor scales, Tensor? bias, int out_features, bool parallel)"
  library.def("int8_linear" VLM_QUANTIZED_ARGS " -> Tensor", &quantized_linear<Format::kInt8>);
  library.def("int4_linear" VLM_QUANTIZED_ARGS " -> Tensor", &quantized_linear<Format::kInt4>);
  library.def("int8_dequantize(Tensor weights, Tensor scales, int out_features, ScalarType dtype) -> Tensor",
              &dequantize<Format::kInt8>);
  library.def("int4_dequantize(Tensor weights, Tensor scales, int out_features, ScalarType dtype) -> Tensor",
              &dequantize<Format::kInt4>);
  library.def("dense_linear(Tensor x, Tensor weight, Tensor? bias, bool parallel) -> Tensor", &dense_linear);
}
