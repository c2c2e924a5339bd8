// The one binding file of the CPU kernels: it only lists exports. Pointers arrive as integers
// (tensor.data_ptr()); the Python launchers in pie/engine/kernels.py check shapes and dtypes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>

#include "cpu/brle.h"
#include "cpu/decode_attention.h"
#include "cpu/linear.h"
#include "cpu/quantized_linear.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;

PYBIND11_MODULE(_kernels_cpu, m) {
  m.doc() = "pie CPU kernels (raw pointers, sizes; error codes returned)";
  m.def(
      "expand_brle",
      [](std::uintptr_t runs, std::uintptr_t run_offsets, int64_t num_rows, int64_t row_len,
         std::uintptr_t out) {
        int64_t bad_row = -1;
        int32_t err;
        {
          py::gil_scoped_release release;
          err = pie::expand_brle(reinterpret_cast<const int32_t*>(runs),
                                 reinterpret_cast<const int64_t*>(run_offsets), num_rows, row_len,
                                 reinterpret_cast<uint8_t*>(out), &bad_row);
        }
        return std::make_pair(err, bad_row);
      },
      py::arg("runs"), py::arg("run_offsets"), py::arg("num_rows"), py::arg("row_len"), py::arg("out"),
      "Expand BRLE mask rows into a (num_rows, row_len) uint8 buffer; returns (error_code, bad_row).");
  m.def("num_threads", [] { return pie::ThreadPool::instance().num_threads(); },
        "Threads of the kernels' pool (PIE_KERNEL_THREADS or the hardware threads).");
  m.def(
      "linear_f32",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, int64_t m, int64_t n, int64_t k) {
        py::gil_scoped_release release;
        return pie::linear_f32(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w),
                               reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), m, n, k);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("m"), py::arg("n"), py::arg("k"),
      "y (m, n) = x (m, k) @ w (n, k)^T + bias (n,) [bias 0 = none], fp32; returns an error code.");
  m.def(
      "linear_bf16",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, int64_t m, int64_t n, int64_t k) {
        py::gil_scoped_release release;
        return pie::linear_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(w),
                                reinterpret_cast<const uint16_t*>(bias), reinterpret_cast<uint16_t*>(y), m, n, k);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("m"), py::arg("n"), py::arg("k"),
      "The same with bf16 tensors (fp32 accumulation); returns an error code.");
  m.def(
      "quantized_linear",
      [](int32_t qtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, int64_t m,
         int64_t n, int64_t k, int32_t isa) {
        py::gil_scoped_release release;
        return pie::quantized_linear(qtype, reinterpret_cast<const float*>(x), reinterpret_cast<const uint8_t*>(w),
                                     reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), m, n, k, isa);
      },
      py::arg("qtype"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("isa"),
      "y (m, n) = x (m, k) fp32 @ dequant(w)^T + bias [0 = none] for w (n, k) in GGML blocks of type qtype; "
      "isa: 0 best, 1 AVX2, 2 AVX-512; returns an error code.");
  m.def("quantized_isas", &pie::quantized_isas,
        "Bit (1 << isa) for each instruction set of quantized_linear this CPU runs.");
  m.def(
      "decode_attention",
      [](bool bf16, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t kv_indptr,
         std::uintptr_t kv_slots, std::uintptr_t q_rows, int64_t num_requests, int64_t num_slots, int64_t num_q_heads,
         int64_t num_kv_heads, int64_t head_dim, float scale, std::uintptr_t out) {
        py::gil_scoped_release release;
        auto i64 = [](std::uintptr_t p) { return reinterpret_cast<const int64_t*>(p); };
        if (bf16) {
          using T = uint16_t;
          return pie::decode_attention<T>(reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k_cache),
                                          reinterpret_cast<const T*>(v_cache), i64(kv_indptr), i64(kv_slots),
                                          i64(q_rows), num_requests, num_slots, num_q_heads, num_kv_heads, head_dim,
                                          scale, reinterpret_cast<T*>(out));
        }
        return pie::decode_attention<float>(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k_cache),
                                            reinterpret_cast<const float*>(v_cache), i64(kv_indptr), i64(kv_slots),
                                            i64(q_rows), num_requests, num_slots, num_q_heads, num_kv_heads, head_dim,
                                            scale, reinterpret_cast<float*>(out));
      },
      "Decode attention over cache slots in place (fp32 or bf16); returns an error code.");
}
