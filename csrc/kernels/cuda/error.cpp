#include "pie_cuda.h"

namespace pie {
namespace cuda {

const char* error_string(int32_t code) {
  switch (code) {
    case kOk: return "ok";
    case kBadArgument: return "invalid argument (a size, count or pointer)";
    case kUnsupportedDtype: return "unsupported dtype";
    case kUnsupportedHeadDim: return "unsupported head_dim (64 or 128)";
    case kLaunchFailed: return "kernel launch failed";
    case kWorkspaceTooSmall: return "workspace missing or too small";
    default: return "unknown error";
  }
}

}  // namespace cuda
}  // namespace pie
