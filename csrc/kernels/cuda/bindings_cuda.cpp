// The one binding file of the CUDA kernels: it only lists exports. Pointers arrive as integers
// (tensor.data_ptr(), 0 for "none") and the stream as an integer
// (torch.cuda.current_stream().cuda_stream); every function returns the kernel's error code.
// The Python launchers in pie/engine/cuda_kernels.py check shapes, dtypes and devices.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "pie_cuda.h"

namespace py = pybind11;
using std::uintptr_t;

namespace {
template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

PYBIND11_MODULE(_kernels_cuda, m) {
  namespace pc = pie::cuda;
  m.doc() = "pie CUDA kernels (raw pointers as ints, sizes, stream last; error codes returned)";
  m.attr("DTYPE_FLOAT32") = int(pc::kFloat32);
  m.attr("DTYPE_FLOAT16") = int(pc::kFloat16);
  m.attr("DTYPE_BFLOAT16") = int(pc::kBFloat16);
  m.def("error_string", &pc::error_string);

  m.def("paged_prefill_attention",
        [](int32_t dtype, uintptr_t q, uintptr_t out, uintptr_t k_cache, uintptr_t v_cache,
           uintptr_t qo_indptr, uintptr_t kv_page_indptr, uintptr_t kv_page_indices,
           uintptr_t kv_last_page_len, uintptr_t work_req, uintptr_t work_tile, int32_t num_work,
           uintptr_t mask, uintptr_t mask_indptr, int32_t page_size, int32_t num_q_heads,
           int32_t num_kv_heads, int32_t head_dim, float sm_scale, uintptr_t stream) {
          return pc::paged_prefill_attention(
              dtype, ptr<const void>(q), ptr<void>(out), ptr<const void>(k_cache),
              ptr<const void>(v_cache), ptr<const int32_t>(qo_indptr),
              ptr<const int32_t>(kv_page_indptr), ptr<const int32_t>(kv_page_indices),
              ptr<const int32_t>(kv_last_page_len), ptr<const int32_t>(work_req),
              ptr<const int32_t>(work_tile), num_work, ptr<const uint32_t>(mask),
              ptr<const int32_t>(mask_indptr), page_size, num_q_heads, num_kv_heads, head_dim,
              sm_scale, stream_of(stream));
        });
  m.def("paged_decode_attention",
        [](int32_t dtype, uintptr_t q, uintptr_t out, uintptr_t k_cache, uintptr_t v_cache,
           uintptr_t qo_indptr, uintptr_t kv_page_indptr, uintptr_t kv_page_indices,
           uintptr_t kv_last_page_len, uintptr_t decode_req, int32_t num_decode,
           int32_t num_chunks, int32_t chunk_tokens, uintptr_t part_o, uintptr_t part_lse,
           uintptr_t mask, uintptr_t mask_indptr, int32_t page_size, int32_t num_q_heads,
           int32_t num_kv_heads, int32_t head_dim, float sm_scale, uintptr_t stream) {
          return pc::paged_decode_attention(
              dtype, ptr<const void>(q), ptr<void>(out), ptr<const void>(k_cache),
              ptr<const void>(v_cache), ptr<const int32_t>(qo_indptr),
              ptr<const int32_t>(kv_page_indptr), ptr<const int32_t>(kv_page_indices),
              ptr<const int32_t>(kv_last_page_len), ptr<const int32_t>(decode_req), num_decode,
              num_chunks, chunk_tokens, ptr<float>(part_o), ptr<float>(part_lse),
              ptr<const uint32_t>(mask), ptr<const int32_t>(mask_indptr), page_size, num_q_heads,
              num_kv_heads, head_dim, sm_scale, stream_of(stream));
        });
  m.def("expand_brle_bits",
        [](uintptr_t runs, uintptr_t run_offsets, int32_t num_rows, uintptr_t row_len,
           uintptr_t row_word_offset, uintptr_t out, uintptr_t bad_rows, uintptr_t stream) {
          return pc::expand_brle_bits(ptr<const int32_t>(runs), ptr<const int64_t>(run_offsets),
                                      num_rows, ptr<const int32_t>(row_len),
                                      ptr<const int32_t>(row_word_offset), ptr<uint32_t>(out),
                                      ptr<int32_t>(bad_rows), stream_of(stream));
        });
  m.def("rope_append_kv",
        [](int32_t dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t positions,
           uintptr_t cos, uintptr_t sin, uintptr_t k_cache, uintptr_t v_cache,
           uintptr_t write_slots, int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
           int32_t head_dim, int64_t q_stride, int64_t k_stride, int64_t v_stride,
           int32_t max_pos, int64_t num_slots, uintptr_t stream) {
          return pc::rope_append_kv(dtype, ptr<void>(q), ptr<const void>(k), ptr<const void>(v),
                                    ptr<const int32_t>(positions), ptr<const float>(cos),
                                    ptr<const float>(sin), ptr<void>(k_cache), ptr<void>(v_cache),
                                    ptr<const int64_t>(write_slots), num_tokens, num_q_heads,
                                    num_kv_heads, head_dim, q_stride, k_stride, v_stride, max_pos,
                                    num_slots, stream_of(stream));
        });
  m.def("rms_norm",
        [](int32_t dtype, uintptr_t x, uintptr_t w, uintptr_t out, int32_t rows, int32_t hidden,
           int64_t x_stride, int64_t out_stride, float eps, uintptr_t stream) {
          return pc::rms_norm(dtype, ptr<const void>(x), ptr<const void>(w), ptr<void>(out), rows,
                              hidden, x_stride, out_stride, eps, stream_of(stream));
        });
  m.def("fused_add_rms_norm",
        [](int32_t dtype, uintptr_t x, uintptr_t residual, uintptr_t w, int32_t rows,
           int32_t hidden, float eps, uintptr_t stream) {
          return pc::fused_add_rms_norm(dtype, ptr<void>(x), ptr<void>(residual),
                                        ptr<const void>(w), rows, hidden, eps, stream_of(stream));
        });
  m.def("softmax", [](int32_t dtype, uintptr_t logits, uintptr_t temperature, uintptr_t probs,
                      int32_t rows, int32_t vocab, uintptr_t stream) {
    return pc::softmax(dtype, ptr<const void>(logits), ptr<const float>(temperature),
                       ptr<float>(probs), rows, vocab, stream_of(stream));
  });
  m.def("logsumexp", [](int32_t dtype, uintptr_t logits, uintptr_t temperature, uintptr_t lse,
                        int32_t rows, int32_t vocab, uintptr_t stream) {
    return pc::logsumexp(dtype, ptr<const void>(logits), ptr<const float>(temperature),
                         ptr<float>(lse), rows, vocab, stream_of(stream));
  });
  m.def("gather_logprobs", [](int32_t dtype, uintptr_t logits, uintptr_t lse, uintptr_t rows,
                              uintptr_t token_ids, int32_t n, int32_t vocab, uintptr_t out,
                              uintptr_t stream) {
    return pc::gather_logprobs(dtype, ptr<const void>(logits), ptr<const float>(lse),
                               ptr<const int32_t>(rows), ptr<const int32_t>(token_ids), n, vocab,
                               ptr<float>(out), stream_of(stream));
  });
  m.def("argmax", [](int32_t dtype, uintptr_t logits, uintptr_t out, int32_t rows, int32_t vocab,
                     uintptr_t stream) {
    return pc::argmax(dtype, ptr<const void>(logits), ptr<int32_t>(out), rows, vocab,
                      stream_of(stream));
  });
  m.def("sample", [](int32_t dtype, uintptr_t logits, uintptr_t temperature, uintptr_t top_k,
                     uintptr_t top_p, uintptr_t min_p, uintptr_t seeds, uintptr_t out,
                     int32_t rows, int32_t vocab, uintptr_t stream) {
    return pc::sample(dtype, ptr<const void>(logits), ptr<const float>(temperature),
                      ptr<const int32_t>(top_k), ptr<const float>(top_p),
                      ptr<const float>(min_p), ptr<const uint64_t>(seeds), ptr<int32_t>(out),
                      rows, vocab, stream_of(stream));
  });
  m.def("top_k_distribution",
        [](int32_t dtype, uintptr_t logits, uintptr_t temperature, int32_t k, uintptr_t out_ids,
           uintptr_t out_probs, int32_t rows, int32_t vocab, uintptr_t stream) {
          return pc::top_k_distribution(dtype, ptr<const void>(logits),
                                        ptr<const float>(temperature), k, ptr<int32_t>(out_ids),
                                        ptr<float>(out_probs), rows, vocab, stream_of(stream));
        });
}
