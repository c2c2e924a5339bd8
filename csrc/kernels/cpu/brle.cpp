#include "cpu/brle.h"

#include <cstring>

namespace pie {

int32_t expand_brle(const int32_t* runs, const int64_t* run_offsets, int64_t num_rows, int64_t row_len,
                    uint8_t* out, int64_t* bad_row) {
  *bad_row = -1;
  if (num_rows < 0 || row_len < 0 || (num_rows > 0 && (run_offsets == nullptr || out == nullptr))) {
    return kBadArgument;
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    uint8_t* row = out + r * row_len;
    int64_t filled = 0;
    uint8_t value = 1;  // the first run is "may attend"
    for (int64_t i = run_offsets[r]; i < run_offsets[r + 1]; ++i) {
      const int64_t n = runs[i];
      if (n < 0) {
        *bad_row = r;
        return kNegativeRun;
      }
      if (filled + n > row_len) {
        *bad_row = r;
        return kRunsDoNotSumToRow;
      }
      std::memset(row + filled, value, static_cast<size_t>(n));
      filled += n;
      value ^= 1;
    }
    if (filled != row_len) {
      *bad_row = r;
      return kRunsDoNotSumToRow;
    }
  }
  return kOk;
}

}  // namespace pie
