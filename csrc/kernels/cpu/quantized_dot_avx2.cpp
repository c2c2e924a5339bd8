// AVX2 + FMA inner product of the quantized linear layer (see quantized_dot.h): per 16 values, the
// u8 weights widen to 16 bits and vpmaddwd sums pairs of products with the int16 activations into 8 int32
// lanes (exact: 2 * 255 * 32767 < 2^24, so the float conversion is exact too), which are scaled by wa * xd of that group of 16 and accumulated in fp32.
#include <immintrin.h>

#include "cpu/quantized_dot.h"

namespace pie {

namespace {

inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// MX rows of x (i0 .. i0 + MX) against the kQuantTileRows weight rows.
template <int MX>
void tile(const uint8_t* wq, const float* wa, const int16_t* xq, const float* xd, int64_t kp, float* acc_out) {
  constexpr int R = kQuantTileRows;
  const int64_t groups = kp / 16;
  __m256 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i xv[MX];
    for (int i = 0; i < MX; ++i)
      xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * kp + 16 * g));
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + r * kp + 16 * g)));
      const float a = wa[r * groups + g];
      for (int i = 0; i < MX; ++i) {
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(wv, xv[i]));
        acc[r][i] = _mm256_fmadd_ps(p, _mm256_set1_ps(a * xd[i * groups + g]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc_out[r * MX + i] = hsum8(acc[r][i]);
}

}  // namespace

void quant_dot_avx2(const uint8_t* wq, const float* wa, int rows, const int16_t* xq, const float* xd, int64_t m,
                    int64_t kp, float* out) {
  const int64_t groups = kp / 16;
  for (int64_t i0 = 0; i0 < m; i0 += 2) {
    float part[kQuantTileRows * 2];
    const int mx = m - i0 >= 2 ? 2 : 1;
    if (mx == 2)
      tile<2>(wq, wa, xq + i0 * kp, xd + i0 * groups, kp, part);
    else
      tile<1>(wq, wa, xq + i0 * kp, xd + i0 * groups, kp, part);
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < mx; ++i) out[r * m + i0 + i] = part[r * mx + i];
  }
}

}  // namespace pie
