// RoPE + append-to-paged-KV, and RMSNorm (plain and fused with the residual add).
// Layouts and semantics: pie_cuda.h.
#include "common.cuh"

namespace pie {
namespace cuda {
namespace {

// grid: num_tokens; block: 128. Each thread takes (head, i) pairs, i < D/2, over q heads, then k
// heads (rotated and stored), then v heads (stored).
template <typename T>
__global__ void rope_append_kernel(T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const int32_t* __restrict__ positions,
                                   const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                   T* __restrict__ k_cache, T* __restrict__ v_cache,
                                   const int64_t* __restrict__ write_slots, int32_t num_q_heads,
                                   int32_t num_kv_heads, int32_t head_dim, int64_t q_stride,
                                   int64_t k_stride, int64_t v_stride, int32_t max_pos,
                                   int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int32_t pos = min(max(positions[t], 0), max_pos - 1);
  const float* c_row = cos_t + int64_t(pos) * half;
  const float* s_row = sin_t + int64_t(pos) * half;
  const int64_t slot = write_slots[t];
  const bool store = slot >= 0 && slot < num_slots;

  T* qt = q + t * q_stride;
  for (int idx = threadIdx.x; idx < num_q_heads * half; idx += blockDim.x) {
    const int h = idx / half, i = idx % half;
    T* x = qt + int64_t(h) * head_dim;
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    const float c = c_row[i], s = s_row[i];
    x[i] = from_float<T>(x1 * c - x2 * s);
    x[i + half] = from_float<T>(x2 * c + x1 * s);
  }
  if (!store) return;
  const T* kt = k + t * k_stride;
  T* kc = k_cache + slot * num_kv_heads * head_dim;
  for (int idx = threadIdx.x; idx < num_kv_heads * half; idx += blockDim.x) {
    const int h = idx / half, i = idx % half;
    const T* x = kt + int64_t(h) * head_dim;
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    const float c = c_row[i], s = s_row[i];
    kc[int64_t(h) * head_dim + i] = from_float<T>(x1 * c - x2 * s);
    kc[int64_t(h) * head_dim + i + half] = from_float<T>(x2 * c + x1 * s);
  }
  const T* vt = v + t * v_stride;
  T* vc = v_cache + slot * num_kv_heads * head_dim;
  for (int idx = threadIdx.x; idx < num_kv_heads * head_dim; idx += blockDim.x) vc[idx] = vt[idx];
}

constexpr int kNormThreads = 256;

// One CTA per row. Pass 1 reads the row for the sum of squares, pass 2 (from L1/L2) normalises.
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, T* out, int32_t hidden,
                    int64_t x_stride, int64_t out_stride, float eps) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* orow = out + blockIdx.x * out_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(xr[i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float rstd = rsqrtf(ss / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float n = to_float(from_float<T>(to_float(xr[i]) * rstd));  // HF: cast before the weight
    orow[i] = from_float<T>(to_float(w[i]) * n);
  }
}

// residual = to_T(x + residual) (written), x = rms_norm(residual) (written).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual,
                              const T* __restrict__ w, int32_t hidden, float eps) {
  __shared__ float scratch[32];
  T* xr = x + int64_t(blockIdx.x) * hidden;
  T* rr = residual + int64_t(blockIdx.x) * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T sum = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    rr[i] = sum;
    const float v = to_float(sum);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);  // contains __syncthreads: rr writes visible to the block
  const float rstd = rsqrtf(ss / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float n = to_float(from_float<T>(to_float(rr[i]) * rstd));
    xr[i] = from_float<T>(to_float(w[i]) * n);
  }
}

}  // namespace

int32_t rope_append_kv(int32_t dtype, void* q, const void* k, const void* v,
                       const int32_t* positions, const float* cos, const float* sin,
                       void* k_cache, void* v_cache, const int64_t* write_slots,
                       int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                       int32_t head_dim, int64_t q_stride, int64_t k_stride, int64_t v_stride,
                       int32_t max_pos, int64_t num_slots, cudaStream_t stream) {
  if (num_tokens < 0 || num_q_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
      head_dim % 2 != 0 || max_pos <= 0 || num_slots < 0)
    return kBadArgument;
  if (num_tokens == 0) return kOk;
  if (!q || !k || !v || !positions || !cos || !sin || !k_cache || !v_cache || !write_slots)
    return kBadArgument;
  return PIE_DISPATCH_DTYPE(dtype, T, [&] {
    rope_append_kernel<T><<<num_tokens, 128, 0, stream>>>(
        static_cast<T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), positions, cos,
        sin, static_cast<T*>(k_cache), static_cast<T*>(v_cache), write_slots, num_q_heads,
        num_kv_heads, head_dim, q_stride, k_stride, v_stride, max_pos, num_slots);
    return launch_status();
  });
}

int32_t rms_norm(int32_t dtype, const void* x, const void* w, void* out, int32_t rows,
                 int32_t hidden, int64_t x_stride, int64_t out_stride, float eps,
                 cudaStream_t stream) {
  if (rows < 0 || hidden <= 0) return kBadArgument;
  if (rows == 0) return kOk;
  if (!x || !w || !out) return kBadArgument;
  return PIE_DISPATCH_DTYPE(dtype, T, [&] {
    rms_norm_kernel<T><<<rows, kNormThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(out), hidden,
        x_stride, out_stride, eps);
    return launch_status();
  });
}

int32_t fused_add_rms_norm(int32_t dtype, void* x, void* residual, const void* w, int32_t rows,
                           int32_t hidden, float eps, cudaStream_t stream) {
  if (rows < 0 || hidden <= 0) return kBadArgument;
  if (rows == 0) return kOk;
  if (!x || !residual || !w) return kBadArgument;
  return PIE_DISPATCH_DTYPE(dtype, T, [&] {
    fused_add_rms_norm_kernel<T><<<rows, kNormThreads, 0, stream>>>(
        static_cast<T*>(x), static_cast<T*>(residual), static_cast<const T*>(w), hidden, eps);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace pie
