// Linear layer over GGUF quantized weights kept packed: y (M, N) = x (M, K) @ dequant(w) (N, K)^T [+ bias].
//
// w is N rows of raw ggml blocks (layouts in pie/engine/quantized.py): Q8_0, Q4_0, Q4_1 (blocks of 32
// values, K % 32 == 0), Q4_K, Q6_K (blocks of 256, K % 256 == 0). Like llama.cpp, x is quantized per
// block of 32 values to int16 (scale amax / 32767, round to nearest), so the products are integer dot
// products (vpmaddwd); the result is exactly sum_k dequant(w)[n, k] * xq[m, k] up to fp32 rounding, with
// |x - xq| <= scale / 2 per value. (int8 activations, as llama.cpp uses with VNNI, were tried: their
// error, ~0.4% of a block's largest value, changes SmolLM2-135M's greedy tokens.)
//
// Tiles of weight rows are unpacked per thread into an L1/L2-resident scratch: unsigned 8-bit values
// q plus, per 16 values, a float scale a and offset b with w = a * q + b (Q8_0 stores q + 128).
#pragma once
#include <cstdint>

namespace pie {

enum QuantType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };  // the GGML type ids

// Instruction sets of the integer dot products; kIsaAuto picks the best the CPU has.
enum QuantIsa : int32_t { kIsaAuto = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

// Bit (1 << isa) set for each QuantIsa this CPU runs.
uint32_t quantized_isas();

// x: (M, K) fp32 row-major; w: (N, K / block_values * block_bytes) bytes; bias: (N,) fp32 or nullptr;
// y: (M, N) fp32 row-major. Returns kOk, or kBadArgument for a bad size, type, pointer or an ISA the
// CPU lacks.
int32_t quantized_linear(int32_t qtype, const float* x, const uint8_t* w, const float* bias, float* y, int64_t m,
                         int64_t n, int64_t k, int32_t isa);

}  // namespace pie
