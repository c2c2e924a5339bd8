// Decode attention over the paged KV cache: one query token per request, reading the request's
// cache slots in place (no gather into a padded tensor).
#pragma once
#include <cstdint>

namespace pie {

// q:         (num_tokens, num_q_heads, head_dim) rows of the batch; request r uses row q_rows[r]
// k_cache:   (num_slots, num_kv_heads, head_dim) one layer of the cache; v_cache likewise
// kv_indptr: (num_requests + 1,) request r attends to slots kv_slots[kv_indptr[r] : kv_indptr[r + 1]]
// kv_slots:  (kv_indptr[num_requests],) flat cache slots, each in [0, num_slots)
// out:       (num_tokens, num_q_heads, head_dim); only the rows q_rows[] are written
// Query head h reads kv head h / (num_q_heads / num_kv_heads) (grouped-query attention).
// A request with no slots gets zeros. T is float or uint16_t (bf16 bits); accumulation is fp32.
template <typename T>
int32_t decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* kv_indptr,
                         const int64_t* kv_slots, const int64_t* q_rows, int64_t num_requests, int64_t num_slots,
                         int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, float scale, T* out);

}  // namespace pie
