// The one binding file of the CPU kernels: it only lists exports. Pointers arrive as integers
// (tensor.data_ptr()); the Python launchers in pie/engine/kernels.py check shapes and dtypes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>

#include "cpu/brle.h"

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
}
