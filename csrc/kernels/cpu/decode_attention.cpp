#include "cpu/decode_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/brle.h"
#include "cpu/simd.h"
#include "cpu/thread_pool.h"

namespace pie {

namespace {

inline void from_f32(float f, float* dst) { *dst = f; }
inline void from_f32(float f, uint16_t* dst) { *dst = f32_to_bf16(f); }

inline void load_f32(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void load_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// One (request, kv head) item: the group of query heads that share this kv head.
template <typename T>
void attend_group(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t len, int64_t q_row,
                  int64_t kv_head, int64_t group, int64_t num_q_heads, int64_t num_kv_heads, int64_t d, float scale,
                  T* out, std::vector<float>& scratch) {
  // scratch: q (group, d) | kv row (d) | scores (group, len) | acc (group, d)
  scratch.resize(static_cast<size_t>(group * d + d + group * len + group * d));
  float* qf = scratch.data();
  float* row = qf + group * d;
  float* scores = row + d;
  float* acc = scores + group * len;
  const int64_t h0 = kv_head * group;
  load_f32(q + (q_row * num_q_heads + h0) * d, group * d, qf);
  std::vector<float> max_score(static_cast<size_t>(group), -INFINITY);
  for (int64_t j = 0; j < len; ++j) {
    load_f32(k_cache + (slots[j] * num_kv_heads + kv_head) * d, d, row);
    for (int64_t g = 0; g < group; ++g) {
      const float s = dot(qf + g * d, row, d) * scale;
      scores[g * len + j] = s;
      max_score[g] = std::max(max_score[g], s);
    }
  }
  std::vector<float> denom(static_cast<size_t>(group), 0.f);
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t j = 0; j < len; ++j) {
      const float p = std::exp(scores[g * len + j] - max_score[g]);
      scores[g * len + j] = p;
      denom[g] += p;
    }
  }
  std::fill(acc, acc + group * d, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    load_f32(v_cache + (slots[j] * num_kv_heads + kv_head) * d, d, row);
    for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + j], row, acc + g * d, d);
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = len > 0 ? 1.f / denom[g] : 0.f;
    T* dst = out + (q_row * num_q_heads + h0 + g) * d;
    for (int64_t i = 0; i < d; ++i) from_f32(acc[g * d + i] * inv, dst + i);
  }
}

}  // namespace

template <typename T>
int32_t decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* kv_indptr,
                         const int64_t* kv_slots, const int64_t* q_rows, int64_t num_requests, int64_t num_slots,
                         int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, float scale, T* out) {
  if (num_requests < 0 || num_q_heads < 1 || num_kv_heads < 1 || head_dim < 1 || num_q_heads % num_kv_heads) {
    return kBadArgument;
  }
  if (num_requests == 0) return kOk;
  for (int64_t r = 0; r < num_requests; ++r) {
    if (kv_indptr[r + 1] < kv_indptr[r]) return kBadArgument;
  }
  for (int64_t i = 0; i < kv_indptr[num_requests]; ++i) {
    if (kv_slots[i] < 0 || kv_slots[i] >= num_slots) return kBadArgument;
  }
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t items = num_requests * num_kv_heads;
  ThreadPool::instance().run(static_cast<int>(std::min<int64_t>(items, 1 << 20)), [&](int share, int shares) {
    std::vector<float> scratch;
    for (int64_t item = share; item < items; item += shares) {
      const int64_t r = item / num_kv_heads, h = item % num_kv_heads;
      attend_group(q, k_cache, v_cache, kv_slots + kv_indptr[r], kv_indptr[r + 1] - kv_indptr[r], q_rows[r], h, group,
                   num_q_heads, num_kv_heads, head_dim, scale, out, scratch);
    }
  });
  return kOk;
}

template int32_t decode_attention<float>(const float*, const float*, const float*, const int64_t*, const int64_t*,
                                         const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float, float*);
template int32_t decode_attention<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*,
                                            const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                            int64_t, float, uint16_t*);

}  // namespace pie
