#include "cpu/linear.h"

#include <immintrin.h>

#include <vector>

#include "cpu/brle.h"
#include "cpu/simd.h"
#include "cpu/thread_pool.h"

namespace pie {

namespace {

constexpr int kRowsPerStep = 4;  // rows of w in flight per inner loop

struct F32Rows {
  static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const float* p) { return *p; }
};

struct BF16Rows {
  static inline __m256 load8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline float load1(const uint16_t* p) { return bf16_to_f32(*p); }
};

// out[r * m + i] = dot(w[row0 + r], x[i]) for r < rows (<= kRowsPerStep), i < M. x is fp32.
template <int M, typename W, typename T>
inline void dot_rows(const float* x, const T* w, int64_t row0, int rows, int64_t k, float* out) {
  __m256 acc[kRowsPerStep][M];
  for (int r = 0; r < kRowsPerStep; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t k8 = k & ~int64_t(7);
  for (int64_t c = 0; c < k8; c += 8) {
    __m256 wv[kRowsPerStep];
    for (int r = 0; r < kRowsPerStep; ++r) wv[r] = r < rows ? W::load8(w + (row0 + r) * k + c) : _mm256_setzero_ps();
    for (int i = 0; i < M; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * k + c);
      for (int r = 0; r < kRowsPerStep; ++r) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < M; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t c = k8; c < k; ++c) s += W::load1(w + (row0 + r) * k + c) * x[i * k + c];
      out[r * M + i] = s;
    }
  }
}

template <int M, typename W, typename T, typename Store>
inline void tile(const float* x, const T* w, int64_t row, int rows, int64_t i0, int64_t k, Store& store) {
  float out[kRowsPerStep * M];
  dot_rows<M, W>(x + i0 * k, w, row, rows, k, out);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < M; ++i) store(i0 + i, row + r, out[r * M + i]);
}

template <typename W, typename T, typename Store>
void linear_dispatch(const float* x, const T* w, int64_t m, int64_t n, int64_t k, Store store) {
  // Rows of w are split across the pool in multiples of kRowsPerStep. Each tile of kRowsPerStep rows
  // of w is read from memory once and stays in L1 while every block of 4 rows of x passes over it.
  const int64_t min_rows_per_share = 64;
  const int max_shares = static_cast<int>(std::max<int64_t>(1, n / min_rows_per_share));
  ThreadPool::instance().run(max_shares, [&](int share, int shares) {
    const int64_t per = ((n + shares - 1) / shares + kRowsPerStep - 1) / kRowsPerStep * kRowsPerStep;
    const int64_t begin = std::min<int64_t>(n, share * per), end = std::min<int64_t>(n, begin + per);
    for (int64_t row = begin; row < end; row += kRowsPerStep) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerStep, end - row));
      for (int64_t i0 = 0; i0 < m; i0 += 4) {
        switch (std::min<int64_t>(4, m - i0)) {
          case 1: tile<1, W>(x, w, row, rows, i0, k, store); break;
          case 2: tile<2, W>(x, w, row, rows, i0, k, store); break;
          case 3: tile<3, W>(x, w, row, rows, i0, k, store); break;
          default: tile<4, W>(x, w, row, rows, i0, k, store); break;
        }
      }
    }
  });
}

}  // namespace

int32_t linear_f32(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k) {
  if (m < 1 || n < 1 || k < 1 || !x || !w || !y) return kBadArgument;
  linear_dispatch<F32Rows>(x, w, m, n, k, [&](int64_t i, int64_t col, float v) {
    y[i * n + col] = bias ? v + bias[col] : v;
  });
  return kOk;
}

int32_t linear_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t m, int64_t n,
                    int64_t k) {
  if (m < 1 || n < 1 || k < 1 || !x || !w || !y) return kBadArgument;
  std::vector<float> xf(static_cast<size_t>(m * k));  // (M, K) x in fp32
  for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_to_f32(x[i]);
  linear_dispatch<BF16Rows>(xf.data(), w, m, n, k, [&](int64_t i, int64_t col, float v) {
    y[i * n + col] = f32_to_bf16(bias ? v + bf16_to_f32(bias[col]) : v);  // one rounding, as torch
  });
  return kOk;
}

}  // namespace pie
