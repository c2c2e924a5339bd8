// Binary run-length encoding (BRLE) of attention-mask rows.
//
// A row of `row_len` booleans is stored as run lengths that alternate between "may attend" (true) and
// "hidden" (false), starting with a "may attend" run (which may be 0 long). Example, row_len 6:
//   runs {2, 3, 1} -> 1 1 0 0 0 1
//   runs {0, 4, 2} -> 0 0 0 0 1 1
#pragma once
#include <cstdint>

namespace pie {

enum KernelError : int32_t {
  kOk = 0,
  kBadArgument = 1,      // a size or pointer is invalid
  kRunsDoNotSumToRow = 2,  // a row's runs do not add up to row_len
  kNegativeRun = 3,
};

// runs:        (total_runs,) int32, the runs of all rows back to back
// run_offsets: (num_rows + 1,) int64, row r's runs are runs[run_offsets[r] : run_offsets[r + 1]]
// out:         (num_rows, row_len) uint8, written with 1 = may attend, 0 = hidden
// Returns kOk, or an error code with *bad_row set to the first offending row.
int32_t expand_brle(const int32_t* runs, const int64_t* run_offsets, int64_t num_rows, int64_t row_len,
                    uint8_t* out, int64_t* bad_row);

}  // namespace pie
