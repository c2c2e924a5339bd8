// The few declarations of the wasmtime C API (component model) that the runtime uses, written from the
// C API documentation for the pinned wasmtime 50.0.1 (the wheel ships no headers). Functions are
// resolved at run time from the wheel's _libwasmtime.so, already loaded by wasmtime-py
// (dlopen RTLD_NOLOAD), so objects made by wasmtime-py (linker, store) can be used here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pie_wt {

struct wasm_byte_vec_t {  // wasm_name_t: UTF-8 bytes, not NUL-terminated
  size_t size;
  uint8_t* data;
};

struct val_t;
struct record_entry_t;

struct vallist_t {  // list and tuple
  size_t size;
  val_t* data;
};

struct valrecord_t {
  size_t size;
  record_entry_t* data;
};

struct valvariant_t {
  wasm_byte_vec_t discriminant;
  val_t* val;  // NULL for a case without payload
};

struct valresult_t {
  bool is_ok;
  val_t* val;
};

// wasmtime_component_valkind_t
enum Kind : uint8_t {
  K_BOOL = 0, K_S8 = 1, K_U8 = 2, K_S16 = 3, K_U16 = 4, K_S32 = 5, K_U32 = 6, K_S64 = 7, K_U64 = 8,
  K_F32 = 9, K_F64 = 10, K_CHAR = 11, K_STRING = 12, K_LIST = 13, K_RECORD = 14, K_TUPLE = 15,
  K_VARIANT = 16, K_ENUM = 17, K_OPTION = 18, K_RESULT = 19, K_FLAGS = 20, K_RESOURCE = 21,
};

union valunion_t {
  bool boolean;
  int8_t s8;
  uint8_t u8;
  int16_t s16;
  uint16_t u16;
  int32_t s32;
  uint32_t u32;
  int64_t s64;
  uint64_t u64;
  float f32;
  double f64;
  uint32_t character;
  wasm_byte_vec_t string;
  vallist_t list;
  valrecord_t record;
  vallist_t tuple;
  valvariant_t variant;
  wasm_byte_vec_t enumeration;
  val_t* option;  // NULL = none
  valresult_t result;
  vallist_t flags_placeholder;
};

struct val_t {  // wasmtime_component_val_t: kind at offset 0, union at offset 8, 32 bytes
  uint8_t kind;
  valunion_t of;
};
static_assert(sizeof(val_t) == 32, "wasmtime_component_val_t is 32 bytes");

struct record_entry_t {
  wasm_byte_vec_t name;
  val_t val;
};

// void* error = cb(env, context, func_type, args, nargs, results, nresults); NULL = success.
// Args are owned by wasmtime (do not free); results are written by the callback with memory from the
// C API's allocators, and wasmtime takes and frees them.
using func_callback_t = void* (*)(void* env, void* context, const void* func_type, val_t* args, size_t nargs,
                                   val_t* results, size_t nresults);
using finalizer_t = void (*)(void*);

struct Api {
  void (*byte_vec_new)(wasm_byte_vec_t* out, size_t size, const uint8_t* data);
  void (*vallist_new_uninit)(vallist_t* out, size_t size);
  void (*valrecord_new_uninit)(valrecord_t* out, size_t size);
  val_t* (*val_new)(val_t* val);  // boxes a value (moved in); for option / variant payloads
  void* (*error_new)(const char* message);
  void* (*linker_instance_add_func)(void* linker_instance, const char* name, size_t name_len,
                                    func_callback_t callback, void* env, finalizer_t finalizer);
  void (*error_message)(const void* error, wasm_byte_vec_t* out);
  void (*byte_vec_delete)(wasm_byte_vec_t* vec);
  void (*error_delete)(void* error);
};

// Resolves the functions from the already-loaded library at `path`; returns an error message or "".
const char* load_api(const char* path);
const Api& api();

}  // namespace pie_wt
