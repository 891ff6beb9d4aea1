// One decode step of a Qwen2-style decoder layer in one call: RMSNorm, q/k/v, rotary, the KV cache write,
// attention, o, residual, RMSNorm, gate/up, SiLU, down, residual, for B rows of one new token each.
//
// With `parallel`, five parallel regions per layer (q/k/v, attention, o, gate/up with the activation, down),
// each splitting 16-row groups (or heads) over torch's intra-op threads; without, all on the calling thread
// (no barrier to wait at: faster when the other cores are busy). Norms, rotary and activation quantization
// are small and always run on the calling thread. Values are rounded to bfloat16 where the eager layer stores them
// (norm outputs, projections, the residual stream, the cache) so both paths agree to bfloat16 rounding;
// float32 layers compute in float32 throughout. Scores and softmax are float32.

#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/extension.h>

#include "matvec.h"

namespace {

using vlm::Activations;
using vlm::Format;
using vlm::kRows;
using vlm::round_to;
using vlm::Weights;

// A linear's weights as Python hands them over (see matvec.h for the formats).
struct Linear : torch::CustomClassHolder {
  Weights weights;
  Linear(int64_t format, torch::Tensor data, c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> bias,
         int64_t out_features)
      : weights(static_cast<Format>(format), std::move(data), scales.value_or(torch::Tensor()),
                bias.value_or(torch::Tensor()), out_features) {}
};

template <typename T>
inline float value(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return p[i];
  } else {
    return vlm::bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
  }
}

template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

template <typename T>
float dot(const float* q, const T* k, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  float sum = vlm::sum_lanes(acc);
  for (; i < n; ++i) sum += q[i] * value(k, i);
  return sum;
}

template <typename T>
void add_scaled(float p, const T* v, float* out, int64_t n) {
  const __m256 scale = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(load8(v + i), scale, _mm256_loadu_ps(out + i)));
  for (; i < n; ++i) out[i] += p * value(v, i);
}

template <typename T>
inline void store(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) {
    p[i] = v;
  } else {
    reinterpret_cast<uint16_t*>(p)[i] = vlm::float_to_bf16(v);
  }
}

// Runs body(begin, end) over [0, n) on the intra-op threads when `parallel`, else on this thread.
template <typename F>
void split(int64_t n, bool parallel, const F& body) {
  if (parallel) {
    at::parallel_for(0, n, 1, body);
  } else {
    body(0, n);
  }
}

constexpr int64_t kParallelAttention = 1 << 15;  // keys x heads (all rows) up to which attention stays on one thread

// One row's KV cache: keys and values (KV heads, capacity, head_dim), where its new token goes, how many keys
// it attends over.
struct Cache {
  void* keys;
  void* values;
  int64_t key_stride, value_stride, position, span;
};

struct DecodeLayer : torch::CustomClassHolder {
  torch::Tensor input_norm, post_norm;
  double eps;
  int64_t heads, kv_heads, head_dim, hidden, intermediate;
  c10::intrusive_ptr<Linear> qkv, o, gate_up, down;

  DecodeLayer(torch::Tensor input_norm, torch::Tensor post_norm, double eps, int64_t heads, int64_t kv_heads,
              int64_t head_dim, c10::intrusive_ptr<Linear> qkv, c10::intrusive_ptr<Linear> o,
              c10::intrusive_ptr<Linear> gate_up, c10::intrusive_ptr<Linear> down)
      : input_norm(input_norm.contiguous()), post_norm(post_norm.contiguous()), eps(eps), heads(heads),
        kv_heads(kv_heads), head_dim(head_dim), hidden(input_norm.numel()), intermediate(down->weights.in_features),
        qkv(std::move(qkv)), o(std::move(o)), gate_up(std::move(gate_up)), down(std::move(down)) {
    TORCH_CHECK(this->qkv->weights.out_features == (heads + 2 * kv_heads) * head_dim,
                "q/k/v rows do not match the heads");
    TORCH_CHECK(this->gate_up->weights.out_features == 2 * intermediate && intermediate % kRows == 0,
                "gate/up must be two matrices of a multiple of 16 rows");
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must be a multiple of the KV heads");
  }

  // x: N rows (any shape of N x hidden values, e.g. (B, 1, D) or (1, N, D)); cos, sin: N x head_dim; row r's
  // cache: keys[r], values[r] (KV heads, capacity, head_dim), its k and v written at positions[r]. It sees its
  // keys up to positions[r], or with a mask (N, span) the keys t < span where mask[r][t] is True. `parallel`:
  // split the work over the intra-op threads.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> keys,
                        std::vector<torch::Tensor> values, std::vector<int64_t> positions,
                        c10::optional<torch::Tensor> mask, bool parallel) {
    const auto dtype = x.scalar_type();
    TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "x must be float32 or bfloat16");
    TORCH_CHECK(x.is_contiguous() && x.size(-1) == hidden, "x must be contiguous rows of ", hidden, " values");
    const int64_t rows = x.numel() / hidden;
    for (const auto* t : {&cos, &sin}) {
      TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->numel() == rows * head_dim, "bad cos/sin");
    }
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == rows && static_cast<int64_t>(values.size()) == rows &&
                    static_cast<int64_t>(positions.size()) == rows, "one cache and position per row");
    const int64_t span = mask.has_value() ? mask->size(-1) : 0;
    if (mask.has_value()) {
      TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->numel() == rows * span,
                  "mask must be a contiguous bool (N, span)");
    }
    std::vector<Cache> caches(rows);
    for (int64_t r = 0; r < rows; ++r) {
      for (const auto* t : {&keys[r], &values[r]}) {
        TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 3 && t->size(0) == kv_heads && t->size(2) == head_dim &&
                        t->stride(2) == 1 && t->stride(1) == head_dim,
                    "keys/values must be (KV heads, capacity, head_dim) of x's dtype, rows contiguous");
      }
      const int64_t capacity = std::min(keys[r].size(1), values[r].size(1)), position = positions[r];
      TORCH_CHECK(0 <= position && position < capacity && (!mask.has_value() || (position < span && span <= capacity)),
                  "position ", position, " is outside the cache or the mask");
      caches[r] = {keys[r].data_ptr(), values[r].data_ptr(), keys[r].stride(0), values[r].stride(0), position,
                   mask.has_value() ? span : position + 1};
    }
    torch::Tensor out = torch::empty_like(x);
    const bool* seen = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    if (dtype == torch::kFloat) {
      step<float>(x, cos, sin, caches, seen, span, parallel, out);
    } else {
      step<at::BFloat16>(x, cos, sin, caches, seen, span, parallel, out);
    }
    return out;
  }

  template <typename T>
  void step(const torch::Tensor& x_, const torch::Tensor& cos_, const torch::Tensor& sin_,
            const std::vector<Cache>& caches, const bool* mask, int64_t mask_span, bool parallel,
            torch::Tensor& out_) const {
    constexpr bool bf16 = !std::is_same_v<T, float>;
    const int64_t batch = x_.numel() / hidden, qkv_width = (heads + 2 * kv_heads) * head_dim;
    const T* x = x_.data_ptr<T>();
    std::vector<float> h(batch * hidden), normed(batch * hidden), projected(batch * qkv_width);
    for (int64_t i = 0; i < batch * hidden; ++i) h[i] = value(x, i);

    // attention block
    rms_norm<T>(h.data(), input_norm.data_ptr<T>(), batch, normed.data());
    Activations a;
    project(*qkv, normed.data(), batch, a, projected.data(), qkv_width, parallel);
    std::vector<float> attended(batch * heads * head_dim);
    attend<T>(projected.data(), cos_.data_ptr<T>(), sin_.data_ptr<T>(), caches, mask, mask_span, parallel,
              attended.data());
    std::vector<float> mixed(batch * hidden);
    project(*o, attended.data(), batch, a, mixed.data(), hidden, parallel);
    for (int64_t i = 0; i < batch * hidden; ++i) h[i] = round_to(h[i] + round_to(mixed[i], bf16), bf16);

    // MLP block: gate and up rows of the same features in one thread, so the activation needs no barrier
    rms_norm<T>(h.data(), post_norm.data_ptr<T>(), batch, normed.data());
    const Weights& gu = gate_up->weights;
    gu.prepare(normed.data(), batch, a);
    std::vector<float> gated(batch * 2 * intermediate), activated(batch * intermediate);
    const int64_t half = intermediate / kRows;
    split(half, parallel, [&](int64_t g0, int64_t g1) {
      gu.multiply(a, g0, g1, gated.data(), 2 * intermediate);
      gu.multiply(a, half + g0, half + g1, gated.data(), 2 * intermediate);
      for (int64_t t = 0; t < batch; ++t) {
        const float* gate = gated.data() + t * 2 * intermediate;
        const float* up = gate + intermediate;
        for (int64_t j = g0 * kRows; j < g1 * kRows; ++j) {
          const float g = round_to(gate[j], bf16);
          const float silu = round_to(g / (1.f + std::exp(-g)), bf16);
          activated[t * intermediate + j] = round_to(silu * round_to(up[j], bf16), bf16);
        }
      }
    });
    project(*down, activated.data(), batch, a, mixed.data(), hidden, parallel);
    T* out = out_.data_ptr<T>();
    for (int64_t i = 0; i < batch * hidden; ++i) store(out, i, h[i] + round_to(mixed[i], bf16));
  }

  // y (M, width) = linear(x), the groups split over the threads.
  static void project(const Linear& linear, const float* x, int64_t m, Activations& a, float* y, int64_t width,
                      bool parallel) {
    const Weights& w = linear.weights;
    w.prepare(x, m, a);
    split(w.groups(), parallel, [&](int64_t g0, int64_t g1) { w.multiply(a, g0, g1, y, width); });
  }

  // RMSNorm in float32, rounded as the eager norm rounds: weight * round(normed), then round.
  template <typename T>
  void rms_norm(const float* h, const T* weight, int64_t m, float* y) const {
    constexpr bool bf16 = !std::is_same_v<T, float>;
    for (int64_t t = 0; t < m; ++t) {
      const float* row = h + t * hidden;
      double squares = 0.0;
      for (int64_t i = 0; i < hidden; ++i) squares += static_cast<double>(row[i]) * row[i];
      const float inverse = 1.f / std::sqrt(static_cast<float>(squares / hidden) + static_cast<float>(eps));
      for (int64_t i = 0; i < hidden; ++i) {
        y[t * hidden + i] = round_to(value(weight, i) * round_to(row[i] * inverse, bf16), bf16);
      }
    }
  }

  // Rotary on q and k, each row's k and v into its cache, then attention of every head over its keys.
  template <typename T>
  void attend(float* qkv_rows, const T* cos, const T* sin, const std::vector<Cache>& caches, const bool* mask,
              int64_t mask_span, bool parallel, float* out) const {
    constexpr bool bf16 = !std::is_same_v<T, float>;
    const int64_t batch = caches.size(), width = (heads + 2 * kv_heads) * head_dim, half = head_dim / 2;
    const int64_t group = heads / kv_heads;
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
    std::vector<float> rotated(head_dim);
    int64_t work = 0;
    for (int64_t b = 0; b < batch; ++b) {
      float* row = qkv_rows + b * width;
      for (int64_t i = 0; i < width; ++i) row[i] = round_to(row[i], bf16);
      for (int64_t head = 0; head < heads + kv_heads; ++head) {
        float* v = row + head * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) {
          const float partner = i < half ? -v[i + half] : v[i - half];
          rotated[i] = round_to(v[i] * value(cos, b * head_dim + i) + partner * value(sin, b * head_dim + i), bf16);
        }
        for (int64_t i = 0; i < head_dim; ++i) v[i] = head < heads ? round_to(rotated[i] * scale, bf16) : rotated[i];
      }
      const Cache& cache = caches[b];
      for (int64_t g = 0; g < kv_heads; ++g) {
        T* k = static_cast<T*>(cache.keys) + g * cache.key_stride + cache.position * head_dim;
        T* v = static_cast<T*>(cache.values) + g * cache.value_stride + cache.position * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) {
          store(k, i, row[(heads + g) * head_dim + i]);
          store(v, i, row[(heads + kv_heads + g) * head_dim + i]);
        }
      }
      work += cache.span * heads;
    }
    split(batch * heads, parallel && work > kParallelAttention, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads, head = task % heads, g = head / group, span = caches[b].span;
        const float* q = qkv_rows + b * width + head * head_dim;
        const T* k = static_cast<const T*>(caches[b].keys) + g * caches[b].key_stride;
        const T* v = static_cast<const T*>(caches[b].values) + g * caches[b].value_stride;
        const bool* seen = mask ? mask + b * mask_span : nullptr;
        scores.resize(span);
        float top = -INFINITY;
        for (int64_t t = 0; t < span; ++t) {
          scores[t] = seen && !seen[t] ? -INFINITY : dot(q, k + t * head_dim, head_dim);
          top = std::max(top, scores[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < span; ++t) {
          total += scores[t] = scores[t] == -INFINITY ? 0.f : std::exp(scores[t] - top);
        }
        float* o = out + b * heads * head_dim + head * head_dim;
        std::fill(o, o + head_dim, 0.f);
        for (int64_t t = 0; t < span; ++t) {
          if (scores[t] != 0.f) add_scaled(scores[t] / total, v + t * head_dim, o, head_dim);
        }
        for (int64_t i = 0; i < head_dim; ++i) o[i] = round_to(o[i], bf16);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlm_kernels, library) {
  library.class_<Linear>("Linear").def(
      torch::init<int64_t, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, int64_t>());
  library.class_<DecodeLayer>("DecodeLayer")
      .def(torch::init<torch::Tensor, torch::Tensor, double, int64_t, int64_t, int64_t, c10::intrusive_ptr<Linear>,
                       c10::intrusive_ptr<Linear>, c10::intrusive_ptr<Linear>, c10::intrusive_ptr<Linear>>())
      .def("forward", &DecodeLayer::forward);
}
