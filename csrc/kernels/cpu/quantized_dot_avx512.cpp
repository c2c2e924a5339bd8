// AVX-512 inner product of the quantized linear layer (see quantized_dot.h); this file alone is compiled
// with -mavx512f -mavx512bw and runs only where cpuid reports them. Per 32 values, the u8 weights widen
// to 16 bits and vpmaddwd sums pairs of products with the int16 activations into 16 int32 lanes (exact:
// 2 * 255 * 32767 < 2^24); the lanes are scaled by wa * xd, both stored per 2 values, and accumulated
// in fp32.
#include <immintrin.h>

#include "cpu/quantized_dot.h"

namespace pie {

namespace {

template <int MX>
void tile(const uint8_t* wq, const float* wa2, const int16_t* xq, const float* xd2, int64_t kp, float* acc_out) {
  constexpr int R = kQuantTileRows;
  const int64_t lanes = kp / 2;  // entries of wa2 / xd2 per row
  __m512 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kp; c += 32) {
    __m512i xv[MX];
    __m512 xs[MX];
    for (int i = 0; i < MX; ++i) {
      xv[i] = _mm512_loadu_si512(xq + i * kp + c);
      xs[i] = _mm512_loadu_ps(xd2 + i * lanes + c / 2);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + r * kp + c)));
      const __m512 ws = _mm512_loadu_ps(wa2 + r * lanes + c / 2);
      for (int i = 0; i < MX; ++i) {
        const __m512 p = _mm512_cvtepi32_ps(_mm512_madd_epi16(wv, xv[i]));
        acc[r][i] = _mm512_fmadd_ps(p, _mm512_mul_ps(ws, xs[i]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc_out[r * MX + i] = _mm512_reduce_add_ps(acc[r][i]);
}

}  // namespace

void quant_dot_avx512(const uint8_t* wq, const float* wa2, int rows, const int16_t* xq, const float* xd2, int64_t m,
                      int64_t kp, float* out) {
  const int64_t lanes = kp / 2;
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    float part[kQuantTileRows * 4];
    const int mx = m - i0 >= 4 ? 4 : static_cast<int>(m - i0);
    const int16_t* x = xq + i0 * kp;
    const float* s = xd2 + i0 * lanes;
    switch (mx) {
      case 1: tile<1>(wq, wa2, x, s, kp, part); break;
      case 2: tile<2>(wq, wa2, x, s, kp, part); break;
      case 3: tile<3>(wq, wa2, x, s, kp, part); break;
      default: tile<4>(wq, wa2, x, s, kp, part); break;
    }
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < mx; ++i) out[r * m + i0 + i] = part[r * mx + i];
  }
}

}  // namespace pie
