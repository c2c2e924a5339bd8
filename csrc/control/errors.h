// Exceptions of the control layer. Each message names the instance, queue, page or handle at fault.
// The bindings map them to Python classes of the same names (all subclasses of ControlError).
#pragma once

#include <stdexcept>
#include <string>

namespace pie::control {

struct ControlError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The command ran and the engine reported an error for it.
struct CommandFailed : ControlError {
  using ControlError::ControlError;
};

// The command will never run: its queue was closed, its instance ended, or the scheduler stopped.
struct CommandCancelled : ControlError {
  using ControlError::ControlError;
};

// Submitting to a closed queue (or a stopped scheduler).
struct QueueClosed : ControlError {
  using ControlError::ControlError;
};

// The instance was terminated (pool exhaustion or an explicit terminate); it may no longer act.
struct InstanceTerminated : ControlError {
  using ControlError::ControlError;
};

// The instance asked for more than its quota allows; nothing else happened.
struct QuotaExceeded : ControlError {
  using ControlError::ControlError;
};

// A handle, page or export name that the caller does not own or that does not exist.
struct InvalidHandle : ControlError {
  using ControlError::ControlError;
};

}  // namespace pie::control
