// Linear layer streaming the weights: y (M, N) = x (M, K) @ w (N, K)^T [+ bias (N,)].
//
// At a few rows (decode) the layer is bound by reading w once from memory; these kernels stream w with
// AVX2 and FMA on every core of the pool (fp32 accumulation), where a BLAS gemv here reads at about
// half the bandwidth. Each tile of w is read once whatever M is, so the bf16 kernel also serves large
// M on CPUs without native bf16 arithmetic. bf16 values are passed as uint16_t bit patterns; outputs
// are rounded to nearest even.
#pragma once
#include <cstdint>

namespace pie {

// x: (M, K) row-major, w: (N, K) row-major, bias: (N,) or nullptr, y: (M, N) row-major.
// Returns kOk, or kBadArgument when a size is not positive or a pointer is null.
int32_t linear_f32(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k);
int32_t linear_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t m, int64_t n,
                    int64_t k);

}  // namespace pie
