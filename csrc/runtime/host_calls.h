// Host functions of the inferlet API implemented in C++ (the hot calls: no GIL, no Python), registered
// on a wasmtime component linker instance through `wasmtime_component_linker_instance_add_func`.
// They act on the instance bound to the calling thread (pie_rt::current_instance()).
#pragma once

#include <cstddef>

namespace pie_rt {

// Registers the hot function `name` of interface `iface` (e.g. "kv", "allocate") on the linker
// instance; returns "" or an error message. Unknown names return an error.
const char* register_hot(void* linker_instance, const char* iface, const char* name);
// Registers `name` as a function that traps with "not implemented yet: <call>".
const char* register_unimplemented(void* linker_instance, const char* name, const char* call);
// True if (iface, name) is implemented in C++.
bool is_hot(const char* iface, const char* name);

// Calls of each hot function since the process started, every instance together (pie_host_calls_total):
// the number of hot functions, and the interface, name and count of the i-th (a relaxed atomic
// increment per call; read at any time).
size_t num_hot_functions();
void hot_function_calls(size_t i, const char** iface, const char** name, unsigned long long* count);

}  // namespace pie_rt
