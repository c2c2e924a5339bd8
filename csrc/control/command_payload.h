// Forward and copy commands as scheduler payloads: a heap std::shared_ptr of the command (the submitter
// keeps its own reference and reads the results from it). One definition for every submitter (the
// bindings, the C ABI, generation streams): the batch loop recognises a command by its release function.
#pragma once

#include <memory>

#include "future.h"

namespace pie::control {

template <typename CommandT>
void release_command(void* payload) {
  delete static_cast<std::shared_ptr<CommandT>*>(payload);
}

template <typename CommandT>
Payload command_payload(std::shared_ptr<CommandT> command) {
  return Payload(new std::shared_ptr<CommandT>(std::move(command)), &release_command<CommandT>);
}

}  // namespace pie::control
