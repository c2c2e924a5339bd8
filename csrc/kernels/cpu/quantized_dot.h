// The per-ISA inner product of the quantized linear layer (compiled once per instruction set, each file
// with its own flags; quantized_linear.cpp picks one at run time). Only plain pointers cross this
// boundary, so no inline or template code is shared between files built with different flags.
#pragma once
#include <cstdint>

namespace pie {

constexpr int kQuantTileRows = 4;  // weight rows per dot tile

// Unpacked operands, Kp = K rounded up to 64 (the padding is zero):
//   wq (rows, Kp) u8: weight values q;  wa, wb (rows, Kp / 16): w = wa * q + wb per 16 values
//   xq (m, Kp) i16: activation values;  xd (m, Kp / 16): their scale per 16 values (that of the
//   enclosing block of 32); the AVX-512 kernel reads wa and xd expanded to one entry per 2 values
//   (Kp / 2 per row) instead.
// out (rows, m): out[r * m + i] = sum_k wa * wq[r, k] * xd * xq[i, k], over k < Kp (the wb term is
// added by the caller). rows <= kQuantTileRows.
using QuantDotFn = void (*)(const uint8_t* wq, const float* wa, int rows, const int16_t* xq, const float* xd,
                            int64_t m, int64_t kp, float* out);

void quant_dot_avx2(const uint8_t* wq, const float* wa, int rows, const int16_t* xq, const float* xd, int64_t m,
                    int64_t kp, float* out);
void quant_dot_avx512(const uint8_t* wq, const float* wa, int rows, const int16_t* xq, const float* xd, int64_t m,
                           int64_t kp, float* out);

}  // namespace pie
