// Weight-only matrix-vector products for CPU decoding steps: y = x W^T (* scale) (+ bias) for
// x of 1 to 8 float32 rows and W an (out, in) int8 (with one float32 scale per output row) or
// bfloat16 matrix. A decoding step streams each weight once, so the kernel's job is to keep
// the memory bus busy: each thread walks its own contiguous block of rows, converts 64 bytes
// of weights at a time to float32 in registers and accumulates in float32 (the activations are
// never rounded). AVX-512 (16 floats per register) or AVX2 + FMA (8), chosen at run time;
// decoding/cpu_kernels.py says when neither can be used.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int64_t kPrefetch = 1024;  // bytes ahead of the current position in the row
constexpr int64_t kGrain = 16;       // rows per parallel task, at least

// One weight as float32 (int8 value, or bfloat16 bits shifted into a float32): the loops' tails.
template <typename T>
inline float scalar_weight(T v) {
  if constexpr (sizeof(T) == 1) {
    return static_cast<float>(v);
  } else {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
}

#define LOWBIT_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

LOWBIT_TARGET inline __m512 int8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
LOWBIT_TARGET inline __m512 bf16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// One row of x, four independent accumulators over 64 weights per step (int8: 64 weights in one
// 64-byte line; bf16: 32 weights per line, two lines per step).
template <typename T>
LOWBIT_TARGET float dot_one(const T* w, const float* x, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
    __m512 w0, w1, w2, w3;
    if constexpr (sizeof(T) == 1) {
      __m512i b = _mm512_loadu_si512(w + k);
      w0 = int8_to_ps(_mm512_castsi512_si128(b));
      w1 = int8_to_ps(_mm512_extracti32x4_epi32(b, 1));
      w2 = int8_to_ps(_mm512_extracti32x4_epi32(b, 2));
      w3 = int8_to_ps(_mm512_extracti32x4_epi32(b, 3));
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch + 64, _MM_HINT_T0);
      __m512i b0 = _mm512_loadu_si512(w + k), b1 = _mm512_loadu_si512(w + k + 32);
      w0 = bf16_to_ps(_mm512_castsi512_si256(b0));
      w1 = bf16_to_ps(_mm512_extracti64x4_epi64(b0, 1));
      w2 = bf16_to_ps(_mm512_castsi512_si256(b1));
      w3 = bf16_to_ps(_mm512_extracti64x4_epi64(b1, 1));
    }
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + k + 48), a3);
  }
  float r = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; k < K; ++k) r += scalar_weight(w[k]) * x[k];
  return r;
}

// M rows of x: each 16 weights are converted once and used by M accumulators.
template <int M, typename T>
LOWBIT_TARGET void dot_rows(const T* w, const float* x, int64_t K, float* out) {
  __m512 acc[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv;
    if constexpr (sizeof(T) == 1) {
      wv = int8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    } else {
      wv = bf16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
  for (; k < K; ++k) {
    const float f = scalar_weight(w[k]);
    for (int m = 0; m < M; ++m) out[m] += f * x[m * K + k];
  }
}

// The same two loops with AVX2 + FMA: 8 floats per register, 32 weights per step.
#define LOWBIT_TARGET2 __attribute__((target("avx2,fma")))

LOWBIT_TARGET2 inline __m256 int8_to_ps8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
LOWBIT_TARGET2 inline __m256 bf16_to_ps8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
template <typename T>
LOWBIT_TARGET2 inline __m256 to_ps8(const T* p) {
  if constexpr (sizeof(T) == 1) {
    return int8_to_ps8(reinterpret_cast<const int8_t*>(p));
  } else {
    return bf16_to_ps8(reinterpret_cast<const uint16_t*>(p));
  }
}
LOWBIT_TARGET2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
LOWBIT_TARGET2 float dot_one_avx2(const T* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(to_ps8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(to_ps8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(to_ps8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(to_ps8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  float r = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) r += scalar_weight(w[k]) * x[k];
  return r;
}

template <int M, typename T>
LOWBIT_TARGET2 void dot_rows_avx2(const T* w, const float* x, int64_t K, float* out) {
  __m256 acc[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv = to_ps8(w + k);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) out[m] = hsum8(acc[m]);
  for (; k < K; ++k) {
    const float f = scalar_weight(w[k]);
    for (int m = 0; m < M; ++m) out[m] += f * x[m * K + k];
  }
}

template <int M, typename T, bool Wide>
void rows_block(const T* W, const float* x, const float* scale, const float* bias, float* y,
                int64_t K, int64_t N, int64_t n0, int64_t n1) {
  float out[M];
  for (int64_t n = n0; n < n1; ++n) {
    if constexpr (M == 1 && Wide) {
      out[0] = dot_one<T>(W + n * K, x, K);
    } else if constexpr (Wide) {
      dot_rows<M, T>(W + n * K, x, K, out);
    } else if constexpr (M == 1) {
      out[0] = dot_one_avx2<T>(W + n * K, x, K);
    } else {
      dot_rows_avx2<M, T>(W + n * K, x, K, out);
    }
    const float s = scale ? scale[n] : 1.0f, b = bias ? bias[n] : 0.0f;
    for (int m = 0; m < M; ++m) y[m * N + n] = out[m] * s + b;
  }
}

template <typename T, bool Wide>
void dispatch(int64_t M, const T* W, const float* x, const float* scale, const float* bias, float* y,
              int64_t K, int64_t N) {
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    switch (M) {
#define LOWBIT_CASE(m) \
  case m:              \
    rows_block<m, T, Wide>(W, x, scale, bias, y, K, N, n0, n1); \
    break;
      LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
      LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
    }
  });
}

template <typename T>
void dispatch_isa(bool wide, int64_t M, const T* W, const float* x, const float* scale, const float* bias,
                  float* y, int64_t K, int64_t N) {
  if (wide) {
    dispatch<T, true>(M, W, x, scale, bias, y, K, N);
  } else {
    dispatch<T, false>(M, W, x, scale, bias, y, K, N);
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

}  // namespace

constexpr int64_t kMaxRows = 8;

// The instruction set the products use: "avx512" where the CPU has it, else "avx2", else "".
std::string best_isa() { return cpu_has_avx512() ? "avx512" : (cpu_has_avx2() ? "avx2" : ""); }

// x: (..., K) float32 of M <= 8 rows; w: (N, K) int8 (with scale: (N,) float32) or bfloat16
// (scale empty); bias: (N,) float32 or empty; isa: "" for the best this CPU has, or "avx2" /
// "avx512" (tests). Returns (..., N) float32.
torch::Tensor lowbit_linear(torch::Tensor x_in, torch::Tensor w, std::optional<torch::Tensor> scale,
                            std::optional<torch::Tensor> bias, const std::string& isa) {
  const std::string use = isa.empty() ? best_isa() : isa;
  TORCH_CHECK((use == "avx512" && cpu_has_avx512()) || (use == "avx2" && cpu_has_avx2()),
              "this CPU cannot run the ", use.empty() ? "kernel (it needs AVX2 and FMA)" : use + " kernel");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be a float32 CPU tensor");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(K > 0 && x_in.numel() % K == 0, "x must have a non-empty last dimension");
  const int64_t M = x_in.numel() / K, N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == K && w.device().is_cpu(),
              "w must be a contiguous (out, in) CPU matrix matching x's width");
  const torch::Tensor x = x_in.contiguous();
  const float* s = nullptr;
  const float* b = nullptr;
  if (scale && scale->defined()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == N,
                "scale must be (out,) float32");
    s = scale->data_ptr<float>();
  }
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be (out,) float32");
    b = bias->data_ptr<float>();
  }
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  auto y = torch::empty(out_shape, x.options());
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(s != nullptr, "an int8 weight needs its scales");
    dispatch_isa<int8_t>(use == "avx512", M, w.data_ptr<int8_t>(), x.data_ptr<float>(), s, b, y.data_ptr<float>(), K, N);
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "w must be int8 or bfloat16, got ", w.scalar_type());
    dispatch_isa<uint16_t>(use == "avx512", M, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), x.data_ptr<float>(), s, b,
                       y.data_ptr<float>(), K, N);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowbit_linear", &lowbit_linear, "y = x w^T * scale + bias for 1 to 8 float32 rows, int8 or bfloat16 w",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bias"), py::arg("isa") = "");
  m.def("best_isa", &best_isa);
  m.attr("max_rows") = kMaxRows;
}
