/* C ABI of the control layer for other compiled modules (the runtime's host functions).
 *
 * Get the table once, with the GIL held:
 *     const PieControlApi* api = (const PieControlApi*)PyCapsule_Import("pie._ext._control._C_API", 0);
 * and check api->version. Functions not marked "GIL" take no GIL and may be called from any thread;
 * submit is lock-free and future_wait blocks on a condition variable.
 *
 * Handles are owned references: release each with its *_release function.
 * A payload submitted here is opaque to the control layer; `release(payload)` runs once when the
 * layer drops it (possibly on another thread). In Python (Batch.payloads) a payload submitted through
 * this API appears as its address (an int); payloads submitted from Python appear as the object.
 * A result set from Python is a PyObject* (borrowed from the future; read it with the GIL), NULL for
 * None.
 *
 * Forward passes and page copies are not opaque: submit_forward / submit_copies take the control layer's
 * own command types (forward_command.h), which Python sees as pie.control.ForwardCommand and
 * PageCopyCommand. Functions are only ever appended to the table (the runtime and the control module are
 * built together, from one tree).
 */
#ifndef PIE_CONTROL_API_H
#define PIE_CONTROL_API_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PIE_CONTROL_API_VERSION 2  // 2: ForwardCommand carries its batch's size, tokens and run times
#define PIE_CONTROL_API_CAPSULE "pie._ext._control._C_API"

typedef struct PieControlQueue PieControlQueue;
typedef struct PieControlPool PieControlPool;
typedef struct PieControlFuture PieControlFuture;
typedef void (*PiePayloadRelease)(void* payload);

/* Return codes of the pool functions (0 = success; otherwise `error` holds the message). */
enum PieControlStatus {
  PIE_OK = 0,
  PIE_ERR_INVALID_ARGUMENT = 1,
  PIE_ERR_INVALID_HANDLE = 2, /* a handle, instance or export the caller does not hold */
  PIE_ERR_QUOTA = 3,
  PIE_ERR_TERMINATED = 4,     /* the calling instance is (now) terminated */
  PIE_ERR_OTHER = 5
};

enum PieFutureStatus { PIE_FUTURE_PENDING = 0, PIE_FUTURE_READY = 1, PIE_FUTURE_FAILED = 2, PIE_FUTURE_CANCELLED = 3 };

typedef struct PieControlApi {
  uint32_t version;
  /* GIL. The queue behind a Python CommandQueue; NULL with a Python error set if it is not one. */
  PieControlQueue* (*queue_from_python)(PyObject* queue);
  void (*queue_release)(PieControlQueue* queue);
  /* A future for the command, or NULL with `error` (NUL-terminated, truncated to error_size) filled;
   * on failure the payload has been released. */
  PieControlFuture* (*submit)(PieControlQueue* queue, int32_t kind, void* payload, PiePayloadRelease release,
                              uint32_t num_tokens, int depends_on_previous, char* error, size_t error_size);
  PieControlFuture* (*synchronize)(PieControlQueue* queue, char* error, size_t error_size);
  /* Blocks until resolved or timeout_seconds pass (negative: no timeout); returns a PieFutureStatus. */
  int (*future_wait)(PieControlFuture* future, double timeout_seconds);
  int (*future_status)(PieControlFuture* future);
  uint64_t (*future_command_id)(PieControlFuture* future);
  /* Valid while the future handle lives: the result (READY) or the error message (FAILED, CANCELLED). */
  void* (*future_result)(PieControlFuture* future);
  const char* (*future_error)(PieControlFuture* future);
  void (*future_release)(PieControlFuture* future);
  /* GIL. A new reference to a Python Future for the same command. */
  PyObject* (*future_to_python)(PieControlFuture* future);

  /* Page pools (KV pages, embedding slots). pool_from_python and pool_release need the GIL; the
   * others take none, except that a call which terminates instances calls the pool's Python
   * on_terminate callback (taking the GIL itself) before returning. Arrays hold `count` entries;
   * prepare_write's out arrays need room for `count` copies. */
  PieControlPool* (*pool_from_python)(PyObject* pool);
  void (*pool_release)(PieControlPool* pool);
  int (*pool_allocate)(PieControlPool* pool, uint64_t instance_id, uint32_t count, uint32_t* out_handles,
                       char* error, size_t error_size);
  int (*pool_free)(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count, char* error,
                   size_t error_size);
  int (*pool_resolve)(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                      uint32_t* out_pages, char* error, size_t error_size);
  int (*pool_fork)(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                   uint32_t* out_handles, char* error, size_t error_size);
  int (*pool_prepare_write)(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                            uint32_t* out_src_pages, uint32_t* out_dst_pages, size_t* out_num_copies, char* error,
                            size_t error_size);

  /* A FORWARD command. `command` points to a std::shared_ptr<pie::control::ForwardCommand>, checked by
   * the caller (check_forward); the control layer shares it. The engine writes the results into the
   * command before the future resolves READY. */
  PieControlFuture* (*submit_forward)(PieControlQueue* queue, const void* command, int depends_on_previous,
                                      char* error, size_t error_size);
  /* A COPY_PAGES command of `count` spans, five uint32 each (pie::control::CopySpan: src_page, src_offset,
   * dst_page, dst_offset, count), run after every earlier command of the queue has finished. `pins` points
   * to `num_pins` std::shared_ptr<void> (pool pins of its pages), which the command keeps while it lives. */
  PieControlFuture* (*submit_copies)(PieControlQueue* queue, const uint32_t* spans, size_t count, const void* pins,
                                     size_t num_pins, char* error, size_t error_size);
  /* pool_resolve, and the pages pinned until the std::shared_ptr<void> written to `out_pins` (and every
   * copy of it) is dropped: for a command that reads or writes them. */
  int (*pool_resolve_pinned)(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                             uint32_t* out_pages, void* out_pins, char* error, size_t error_size);
  /* pool_prepare_write, with the copies' source and destination pages pinned in `out_pins` (a
   * std::shared_ptr<void>*; left empty when there is nothing to copy). */
  int (*pool_prepare_write_pinned)(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                                   uint32_t* out_src_pages, uint32_t* out_dst_pages, size_t* out_num_copies,
                                   void* out_pins, char* error, size_t error_size);
} PieControlApi;

#ifdef __cplusplus
}
#endif

#endif /* PIE_CONTROL_API_H */
