// The C++ interface of pie's CUDA kernels. Every function takes raw device pointers and sizes, the
// stream LAST, validates what it can see (sizes, dtype codes, null pointers), launches, and returns an
// error code (kOk = 0). Launches are asynchronous: an error inside a kernel shows at the next sync.
// Layouts (all row-major, contiguous unless a stride is given; T = fp16 or bf16 as `dtype` says):
//   paged KV cache, per layer:  k_cache, v_cache  (num_pages, page_size, num_kv_heads, head_dim) T
//   ragged batch:  qo_indptr (R+1,) int32 over flattened tokens; kv_page_indptr (R+1,) int32;
//                  kv_page_indices (total_pages,) int32; kv_last_page_len (R,) int32 in 1..page_size.
//   Request r's KV sequence is its pages in order, all full but the last:
//     kv_len(r) = (num_pages(r) - 1) * page_size + kv_last_page_len[r];
//   its input token i (of qo_len(r)) sits at sequence index kv_len - qo_len + i and, with no mask,
//   sees sequence indices j <= kv_len - qo_len + i (causal).
//   custom masks: bit-packed rows, bit j of row t = token t may attend sequence index j. Request r's
//   rows start at word mask_indptr[r] (int32 words), row i of it at mask_indptr[r] + i * ceil(kv_len/32).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pie {
namespace cuda {

enum Error : int32_t {
  kOk = 0,
  kBadArgument = 1,         // a size, count or pointer is invalid
  kUnsupportedDtype = 2,    // dtype code not fp16/bf16 (or fp32 where allowed)
  kUnsupportedHeadDim = 3,  // head_dim not 64 or 128
  kLaunchFailed = 4,        // cudaGetLastError() reported a failure after launch
  kWorkspaceTooSmall = 5,
};

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* error_string(int32_t code);

// ---------------------------------------------------------------- attention
// Prefill / general path: one CTA per (work item, q head); work item w covers the 128 input tokens
// [work_tile[w] * 128, +128) of request work_req[w]. q, out: (num_tokens, num_q_heads, head_dim) T.
// mask / mask_indptr: null for causal, else custom bit masks (layout above) for every listed request.
int32_t paged_prefill_attention(int32_t dtype, const void* q, void* out, const void* k_cache,
                                const void* v_cache, const int32_t* qo_indptr,
                                const int32_t* kv_page_indptr, const int32_t* kv_page_indices,
                                const int32_t* kv_last_page_len, const int32_t* work_req,
                                const int32_t* work_tile, int32_t num_work, const uint32_t* mask,
                                const int32_t* mask_indptr, int32_t page_size, int32_t num_q_heads,
                                int32_t num_kv_heads, int32_t head_dim, float sm_scale,
                                cudaStream_t stream);

// Decode path: requests with exactly one input token, listed in decode_req (num_decode,).
// The KV sequence is cut into num_chunks chunks of chunk_tokens tokens (split-KV); with
// num_chunks > 1 partial results go to part_o (num_chunks, num_decode, num_q_heads, head_dim) fp32
// and part_lse (num_chunks, num_decode, num_q_heads) fp32 and a merge kernel writes out.
// chunk_tokens * num_chunks must cover the longest listed sequence.
int32_t paged_decode_attention(int32_t dtype, const void* q, void* out, const void* k_cache,
                               const void* v_cache, const int32_t* qo_indptr,
                               const int32_t* kv_page_indptr, const int32_t* kv_page_indices,
                               const int32_t* kv_last_page_len, const int32_t* decode_req,
                               int32_t num_decode, int32_t num_chunks, int32_t chunk_tokens,
                               float* part_o, float* part_lse, const uint32_t* mask,
                               const int32_t* mask_indptr, int32_t page_size, int32_t num_q_heads,
                               int32_t num_kv_heads, int32_t head_dim, float sm_scale,
                               cudaStream_t stream);

// BRLE mask rows -> bit rows. runs (total_runs,) int32; run_offsets (num_rows+1,) int64;
// row_len (num_rows,) int32 (= kv_len of the row's request); row_word_offset (num_rows,) int32;
// out: words, row t written at out[row_word_offset[t] : + ceil(row_len[t]/32)] (tail bits 0).
// Malformed rows (negative runs, runs not summing to row_len) are clipped/padded with "hidden" and
// counted into *bad_rows (device int32, may be null).
int32_t expand_brle_bits(const int32_t* runs, const int64_t* run_offsets, int32_t num_rows,
                         const int32_t* row_len, const int32_t* row_word_offset, uint32_t* out,
                         int32_t* bad_rows, cudaStream_t stream);

// ---------------------------------------------------------------- RoPE + KV append
// q (num_tokens, num_q_heads, head_dim) T with token stride q_stride (elements), rotated in place;
// k, v (num_tokens, num_kv_heads, head_dim) T with strides k_stride, v_stride: k rotated, then k and
// v written to k_cache / v_cache at flat slot write_slots[t] = page * page_size + offset.
// cos, sin: (max_pos, head_dim / 2) fp32; positions (num_tokens,) int32 (clamped to [0, max_pos)).
// Rotation is Llama rotate-half: x1 = x[:d/2], x2 = x[d/2:] -> (x1 c - x2 s, x2 c + x1 s).
// Slots outside [0, num_slots) are skipped.
int32_t rope_append_kv(int32_t dtype, void* q, const void* k, const void* v,
                       const int32_t* positions, const float* cos, const float* sin,
                       void* k_cache, void* v_cache, const int64_t* write_slots,
                       int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                       int32_t head_dim, int64_t q_stride, int64_t k_stride, int64_t v_stride,
                       int32_t max_pos, int64_t num_slots, cudaStream_t stream);

// ---------------------------------------------------------------- RMSNorm
// out = to_T(w * to_T(x * rsqrt(mean(x^2) + eps))) per row (HF Llama rounding); x, out (rows, hidden)
// T with row strides x_stride / out_stride; w (hidden,) T. out may alias x.
int32_t rms_norm(int32_t dtype, const void* x, const void* w, void* out, int32_t rows,
                 int32_t hidden, int64_t x_stride, int64_t out_stride, float eps,
                 cudaStream_t stream);
// In place: residual = to_T(x + residual); x = rms_norm(residual). Both (rows, hidden) contiguous.
int32_t fused_add_rms_norm(int32_t dtype, void* x, void* residual, const void* w, int32_t rows,
                           int32_t hidden, float eps, cudaStream_t stream);

// ---------------------------------------------------------------- sampling
// logits (rows, vocab) of logits_dtype (fp32, fp16 or bf16), row stride = vocab.
// temperature (rows,) fp32: > 0 divides the logits; <= 0 means greedy in `sample` and is read as 1
// elsewhere. A null temperature pointer means 1 for every row.
// probs (rows, vocab) fp32 = softmax(logits / t).
int32_t softmax(int32_t logits_dtype, const void* logits, const float* temperature, float* probs,
                int32_t rows, int32_t vocab, cudaStream_t stream);
// lse (rows,) fp32: natural-log logsumexp of logits / temperature (temperature null: of the logits).
int32_t logsumexp(int32_t logits_dtype, const void* logits, const float* temperature, float* lse,
                  int32_t rows, int32_t vocab, cudaStream_t stream);
// out (n,) fp32: logits[rows[i], token_ids[i]] - lse[rows[i]] (ids outside the vocab give -inf).
int32_t gather_logprobs(int32_t logits_dtype, const void* logits, const float* lse,
                        const int32_t* rows, const int32_t* token_ids, int32_t n, int32_t vocab,
                        float* out, cudaStream_t stream);
// out (rows,) int32: index of the largest logit (lowest index on ties; NaN never chosen unless all).
int32_t argmax(int32_t logits_dtype, const void* logits, int32_t* out, int32_t rows, int32_t vocab,
               cudaStream_t stream);
// out (rows,) int32: one draw per row from softmax(logits / t) filtered by top-k (top_k <= 0 or
// >= vocab: off), then top-p over what top-k kept (top_p >= 1: off), then min-p (keep p >=
// min_p * max p; min_p <= 0: off); ties at a threshold are kept. The uniform number of row i is
// philox4x32-10(key = seeds[i], counter = 0) word 0, top 24 bits / 2^24; rows with t <= 0 take argmax.
int32_t sample(int32_t logits_dtype, const void* logits, const float* temperature,
               const int32_t* top_k, const float* top_p, const float* min_p,
               const uint64_t* seeds, int32_t* out, int32_t rows, int32_t vocab,
               cudaStream_t stream);
// The k most likely tokens per row, probabilities descending (ties: lower id first):
// out_ids (rows, k) int32, out_probs (rows, k) fp32 under softmax(logits / t) (t <= 0 read as 1).
// 1 <= k <= min(vocab, 1024).
int32_t top_k_distribution(int32_t logits_dtype, const void* logits, const float* temperature,
                           int32_t k, int32_t* out_ids, float* out_probs, int32_t rows,
                           int32_t vocab, cudaStream_t stream);

}  // namespace cuda
}  // namespace pie
