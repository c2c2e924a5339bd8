// Sampling over logits rows: softmax with temperature, logsumexp / logprobs, argmax, filtered
// sampling (top-k, top-p, min-p) and the top-k distribution. One CTA per row; filters are found by
// radix selection over order-preserving 32-bit keys of the logits (4 passes of 8 bits), so no sort.
// Semantics: pie_cuda.h.
#include "common.cuh"

namespace pie {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename L>
__device__ __forceinline__ float logit(const L* row, int32_t i) {
  return to_float(row[i]);
}

// Order-preserving map float -> uint32 (a < b  <=>  key(a) < key(b); -inf lowest, NaN above +inf).
// -0.0 maps like +0.0 (f + 0 is +0 for both), so equal floats always have equal keys.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t b = __float_as_uint(f + 0.f);
  return b ^ ((b >> 31) ? 0xffffffffu : 0x80000000u);
}

__device__ __forceinline__ float inv_temperature(const float* temperature, int row) {
  if (temperature == nullptr) return 1.f;
  const float t = temperature[row];
  return t > 0.f ? 1.f / t : 1.f;
}

struct ArgMax {
  float v;
  int32_t i;
};
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  // larger value wins; NaN loses to anything; ties -> lower index
  if (isnan(a.v)) return b;
  if (isnan(b.v)) return a;
  if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
  return a;
}

// Block-wide argmax of the row; every thread gets the result.
template <typename L>
__device__ __forceinline__ ArgMax block_argmax(const L* row, int32_t vocab, float* sv, int32_t* si) {
  ArgMax best{NAN, vocab};
  for (int32_t i = threadIdx.x; i < vocab; i += kThreads) best = better(best, {logit(row, i), i});
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
    best = better(best, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) { sv[warp] = best.v; si[warp] = best.i; }
  __syncthreads();
  best = lane < kWarps ? ArgMax{sv[lane], si[lane]} : ArgMax{NAN, vocab};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
    best = better(best, other);
  }
  if (best.i >= vocab) best.i = 0;  // an all-NaN row
  return best;
}

struct RadixScratch {
  float hist[kWarps][256];  // per-warp histograms (less atomic contention)
  float total[256];
  uint32_t prefix;
  float above;
  int32_t bin;
};

// The largest key t such that the weight of {i : cand(i), key(i) >= t} is >= target (target > 0
// and at most the candidates' total weight; otherwise: the lowest candidate key, keeping them all).
// cand(i) -> bool, weight(i) -> float >= 0.
template <typename Key, typename Cand, typename Weight>
__device__ __forceinline__ uint32_t radix_select(int32_t vocab, float target, Key key_of, Cand cand,
                                 Weight weight, RadixScratch& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.above = 0.f;
  }
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    const uint32_t hi_mask = level == 0 ? 0u : (0xffffffffu << (shift + 8));
    for (int i = threadIdx.x; i < kWarps * 256; i += kThreads) (&s.hist[0][0])[i] = 0.f;
    __syncthreads();
    const uint32_t prefix = s.prefix;
    for (int32_t i = threadIdx.x; i < vocab; i += kThreads) {
      const uint32_t k = key_of(i);
      if ((k & hi_mask) == prefix && cand(i, k)) atomicAdd(&s.hist[warp][(k >> shift) & 255u], weight(i));
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += s.hist[w][b];
      s.total[b] = sum;
    }
    __syncthreads();
    if (warp == 0) {
      // lane owns bins 8*lane .. 8*lane+7; suffix sums over lanes give the weight above each bin
      float own = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) own += s.total[lane * 8 + e];
      float incl = own;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_down_sync(0xffffffffu, incl, o);
        if (lane + o < 32) incl += y;
      }
      const float above_lane = s.above + (incl - own);  // weight in bins above this lane's bins
      int found = -1;
      float found_above = 0.f;
      float cum = above_lane;
      for (int e = 7; e >= 0; --e) {
        const int b = lane * 8 + e;
        const float h = s.total[b];
        if (found < 0 && h > 0.f && cum + h >= target) {
          found = b;
          found_above = cum;
        }
        cum += h;
      }
      // the largest qualifying bin over all lanes; if none, the lowest non-empty bin
      int lowest = 256;
      for (int e = 0; e < 8; ++e)
        if (s.total[lane * 8 + e] > 0.f) { lowest = lane * 8 + e; break; }
      int best = found;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) lowest = min(lowest, __shfl_xor_sync(0xffffffffu, lowest, o));
      __syncwarp();  // every lane has read s.above (above_lane) before one lane rewrites it
      if (best >= 0) {
        if (found == best) {  // exactly one lane owns it
          s.bin = best;
          s.above = found_above;
        }
      } else if (lane == 0) {
        // nothing reaches target (it exceeds the total): take the lowest non-empty bin, and at the
        // next levels again, which ends at the lowest candidate key (all candidates kept)
        s.bin = lowest < 256 ? lowest : 0;
      }
      __syncwarp();
      if (lane == 0) s.prefix = prefix | (uint32_t(s.bin) << shift);
    }
    __syncthreads();
  }
  const uint32_t t = s.prefix;
  __syncthreads();
  return t;
}


// Philox4x32-10 (Random123), counter 0, key = seed: word 0 -> uniform in [0, 1) with 24 bits.
__device__ __forceinline__ float philox_uniform(uint64_t seed) {
  uint32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  return float(c0 >> 8) * (1.f / 16777216.f);
}

// row max and sum of exp((l - max) * inv_t); every thread gets both.
template <typename L>
__device__ __forceinline__ void row_stats(const L* row, int32_t vocab, float inv_t, float* scratch, float& mx,
                          float& sum) {
  float m = -INFINITY;
  for (int32_t i = threadIdx.x; i < vocab; i += kThreads) m = fmaxf(m, logit(row, i));
  m = block_max(m, scratch);
  float z = 0.f;
  if (m != -INFINITY)
    for (int32_t i = threadIdx.x; i < vocab; i += kThreads) z += expf((logit(row, i) - m) * inv_t);
  z = block_sum(z, scratch);
  mx = m;
  sum = z;
}

template <typename L>
__global__ void __launch_bounds__(kThreads, 1)
    softmax_kernel(const L* __restrict__ logits, const float* __restrict__ temperature,
                   float* __restrict__ probs, int32_t vocab) {
  __shared__ float scratch[32];
  const L* row = logits + int64_t(blockIdx.x) * vocab;
  float* prow = probs + int64_t(blockIdx.x) * vocab;
  const float inv_t = inv_temperature(temperature, blockIdx.x);
  float mx, z;
  row_stats(row, vocab, inv_t, scratch, mx, z);
  const float inv_z = z > 0.f ? 1.f / z : 0.f;
  for (int32_t i = threadIdx.x; i < vocab; i += kThreads)
    prow[i] = mx == -INFINITY ? 0.f : expf((logit(row, i) - mx) * inv_t) * inv_z;
}

template <typename L>
__global__ void __launch_bounds__(kThreads, 1)
    logsumexp_kernel(const L* __restrict__ logits, const float* __restrict__ temperature,
                     float* __restrict__ lse, int32_t vocab) {
  __shared__ float scratch[32];
  const L* row = logits + int64_t(blockIdx.x) * vocab;
  const float inv_t = inv_temperature(temperature, blockIdx.x);
  float mx, z;
  row_stats(row, vocab, inv_t, scratch, mx, z);
  if (threadIdx.x == 0) lse[blockIdx.x] = mx == -INFINITY ? -INFINITY : mx * inv_t + logf(z);
}

template <typename L>
__global__ void gather_logprobs_kernel(const L* __restrict__ logits, const float* __restrict__ lse,
                                       const int32_t* __restrict__ rows,
                                       const int32_t* __restrict__ token_ids, int32_t n,
                                       int32_t vocab, float* __restrict__ out) {
  const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t r = rows[i], t = token_ids[i];
  out[i] = (t < 0 || t >= vocab) ? -INFINITY : logit(logits + int64_t(r) * vocab, t) - lse[r];
}

template <typename L>
__global__ void __launch_bounds__(kThreads, 1)
    argmax_kernel(const L* __restrict__ logits, int32_t* __restrict__ out, int32_t vocab) {
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  const ArgMax a = block_argmax(logits + int64_t(blockIdx.x) * vocab, vocab, sv, si);
  if (threadIdx.x == 0) out[blockIdx.x] = a.i;
}

template <typename L>
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const L* __restrict__ logits, const float* __restrict__ temperature,
                  const int32_t* __restrict__ top_k, const float* __restrict__ top_p,
                  const float* __restrict__ min_p, const uint64_t* __restrict__ seeds,
                  int32_t* __restrict__ out, int32_t vocab) {
  __shared__ float scratch[32];
  __shared__ int32_t si[32];
  __shared__ RadixScratch rs;
  __shared__ int32_t chosen;
  const int rid = blockIdx.x;
  const L* row = logits + int64_t(rid) * vocab;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  const ArgMax best = block_argmax(row, vocab, scratch, si);
  const float t = temperature != nullptr ? temperature[rid] : 1.f;
  if (!(t > 0.f) || best.v == -INFINITY || isnan(best.v) || isinf(best.v)) {
    if (threadIdx.x == 0) out[rid] = best.i;  // greedy, or a row with no finite maximum
    return;
  }
  const float inv_t = 1.f / t, mx = best.v;
  auto key_of = [=](int32_t i) { return order_key(logit(row, i)); };
  auto weight = [=](int32_t i) { return expf((logit(row, i) - mx) * inv_t); };  // p_i / p_max

  // top-k threshold: the k-th largest key (all ties kept)
  uint32_t tk = 0;
  const int32_t k = top_k != nullptr ? top_k[rid] : 0;
  if (k > 0 && k < vocab)
    tk = radix_select(vocab, float(k), key_of, [](int32_t, uint32_t) { return true; },
                      [](int32_t) { return 1.f; }, rs);
  // top-p threshold over what top-k kept
  uint32_t tp = 0;
  const float p = top_p != nullptr ? top_p[rid] : 1.f;
  if (p < 1.f) {
    float wk = 0.f;
    for (int32_t i = threadIdx.x; i < vocab; i += kThreads)
      if (key_of(i) >= tk) wk += weight(i);
    wk = block_sum(wk, scratch);
    tp = radix_select(vocab, fmaxf(p, 0.f) * wk, key_of,
                      [tk](int32_t, uint32_t key) { return key >= tk; }, weight, rs);
  }
  const uint32_t tkeep = max(tk, tp);
  const float mp = min_p != nullptr ? min_p[rid] : 0.f;
  auto kept_weight = [=](int32_t i) {
    if (key_of(i) < tkeep) return 0.f;
    const float w = weight(i);
    return w >= mp ? w : 0.f;
  };

  // draw: u * total, located by warp segment, then lane sub-segment, then one lane's scan
  const int32_t seg = (vocab + kWarps - 1) / kWarps;
  const int32_t seg0 = warp * seg, seg1 = min(vocab, seg0 + seg);
  float wsum = 0.f;
  for (int32_t i = seg0 + lane; i < seg1; i += 32) wsum += kept_weight(i);
  wsum = warp_sum(wsum);
  __syncthreads();
  if (lane == 0) scratch[warp] = wsum;
  if (threadIdx.x == 0) chosen = best.i;  // fallback if rounding leaves the target uncovered
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  const float target = philox_uniform(seeds[rid]) * total;
  float base = 0.f;
  int sel = -1;
  for (int w = 0; w < kWarps; ++w) {
    if (base + scratch[w] > target) { sel = w; break; }
    base += scratch[w];
  }
  if (warp == sel) {
    const int32_t sub = (seg1 - seg0 + 31) / 32;
    const int32_t s0 = seg0 + lane * sub, s1 = min(seg1, s0 + sub);
    float own = 0.f;
    for (int32_t i = s0; i < s1; ++i) own += kept_weight(i);
    float incl = own;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, base + incl > target);
    if (hit != 0u && lane == __ffs(hit) - 1) {
      float run = base + incl - own;
      int32_t last_kept = -1;
      for (int32_t i = s0; i < s1; ++i) {
        const float w = kept_weight(i);
        if (w > 0.f) last_kept = i;
        run += w;
        if (run > target) break;
      }
      if (last_kept >= 0) chosen = last_kept;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) out[rid] = chosen;
}

constexpr int kTopKCap = 2048;  // candidates kept for sorting (> the largest k, 1024)

template <typename L>
__global__ void __launch_bounds__(kThreads, 1)
    top_k_distribution_kernel(const L* __restrict__ logits, const float* __restrict__ temperature,
                              int32_t k, int32_t* __restrict__ out_ids,
                              float* __restrict__ out_probs, int32_t vocab) {
  __shared__ float scratch[32];
  __shared__ RadixScratch rs;
  __shared__ uint32_t cand_key[kTopKCap];
  __shared__ int32_t cand_idx[kTopKCap];
  __shared__ int32_t num_cand;
  const int rid = blockIdx.x;
  const L* row = logits + int64_t(rid) * vocab;
  const float inv_t = inv_temperature(temperature, rid);
  float mx, z;
  row_stats(row, vocab, inv_t, scratch, mx, z);
  auto key_of = [=](int32_t i) { return order_key(logit(row, i)); };
  const uint32_t tk =
      k < vocab ? radix_select(vocab, float(k), key_of, [](int32_t, uint32_t) { return true; },
                               [](int32_t) { return 1.f; }, rs)
                : 0u;
  if (threadIdx.x == 0) num_cand = 0;
  __syncthreads();
  for (int32_t i = threadIdx.x; i < vocab; i += kThreads) {
    const uint32_t key = key_of(i);
    if (key >= tk) {
      const int32_t slot = atomicAdd(&num_cand, 1);
      if (slot < kTopKCap) {
        cand_key[slot] = key;
        cand_idx[slot] = i;
      }
    }
  }
  __syncthreads();
  const int32_t n = min(num_cand, kTopKCap);
  const float inv_z = z > 0.f ? 1.f / z : 0.f;
  for (int c = threadIdx.x; c < n; c += kThreads) {
    const uint32_t key = cand_key[c];
    const int32_t idx = cand_idx[c];
    int32_t rank = 0;
    for (int o = 0; o < n; ++o)
      rank += (cand_key[o] > key) || (cand_key[o] == key && cand_idx[o] < idx);
    if (rank < k) {
      out_ids[int64_t(rid) * k + rank] = idx;
      out_probs[int64_t(rid) * k + rank] =
          mx == -INFINITY ? 0.f : expf((logit(row, idx) - mx) * inv_t) * inv_z;
    }
  }
}

#define PIE_DISPATCH_LOGITS(dtype, L, ...)    \
  [&]() -> int32_t {                          \
    switch (dtype) {                          \
      case kFloat32: {                        \
        using L = float;                      \
        return __VA_ARGS__();                 \
      }                                       \
      case kFloat16: {                        \
        using L = __half;                     \
        return __VA_ARGS__();                 \
      }                                       \
      case kBFloat16: {                       \
        using L = __nv_bfloat16;              \
        return __VA_ARGS__();                 \
      }                                       \
      default:                                \
        return kUnsupportedDtype;             \
    }                                         \
  }()

bool bad_rows(int32_t rows, int32_t vocab) { return rows < 0 || vocab <= 0 || rows > (1 << 30); }

}  // namespace

int32_t softmax(int32_t logits_dtype, const void* logits, const float* temperature, float* probs,
                int32_t rows, int32_t vocab, cudaStream_t stream) {
  if (bad_rows(rows, vocab)) return kBadArgument;
  if (rows == 0) return kOk;
  if (!logits || !probs) return kBadArgument;
  return PIE_DISPATCH_LOGITS(logits_dtype, L, [&] {
    softmax_kernel<L><<<rows, kThreads, 0, stream>>>(static_cast<const L*>(logits), temperature,
                                                     probs, vocab);
    return launch_status();
  });
}

int32_t logsumexp(int32_t logits_dtype, const void* logits, const float* temperature, float* lse,
                  int32_t rows, int32_t vocab, cudaStream_t stream) {
  if (bad_rows(rows, vocab)) return kBadArgument;
  if (rows == 0) return kOk;
  if (!logits || !lse) return kBadArgument;
  return PIE_DISPATCH_LOGITS(logits_dtype, L, [&] {
    logsumexp_kernel<L><<<rows, kThreads, 0, stream>>>(static_cast<const L*>(logits), temperature,
                                                       lse, vocab);
    return launch_status();
  });
}

int32_t gather_logprobs(int32_t logits_dtype, const void* logits, const float* lse,
                        const int32_t* rows, const int32_t* token_ids, int32_t n, int32_t vocab,
                        float* out, cudaStream_t stream) {
  if (n < 0 || vocab <= 0) return kBadArgument;
  if (n == 0) return kOk;
  if (!logits || !lse || !rows || !token_ids || !out) return kBadArgument;
  return PIE_DISPATCH_LOGITS(logits_dtype, L, [&] {
    gather_logprobs_kernel<L><<<(n + 255) / 256, 256, 0, stream>>>(
        static_cast<const L*>(logits), lse, rows, token_ids, n, vocab, out);
    return launch_status();
  });
}

int32_t argmax(int32_t logits_dtype, const void* logits, int32_t* out, int32_t rows, int32_t vocab,
               cudaStream_t stream) {
  if (bad_rows(rows, vocab)) return kBadArgument;
  if (rows == 0) return kOk;
  if (!logits || !out) return kBadArgument;
  return PIE_DISPATCH_LOGITS(logits_dtype, L, [&] {
    argmax_kernel<L><<<rows, kThreads, 0, stream>>>(static_cast<const L*>(logits), out, vocab);
    return launch_status();
  });
}

int32_t sample(int32_t logits_dtype, const void* logits, const float* temperature,
               const int32_t* top_k, const float* top_p, const float* min_p,
               const uint64_t* seeds, int32_t* out, int32_t rows, int32_t vocab,
               cudaStream_t stream) {
  if (bad_rows(rows, vocab)) return kBadArgument;
  if (rows == 0) return kOk;
  if (!logits || !seeds || !out) return kBadArgument;
  return PIE_DISPATCH_LOGITS(logits_dtype, L, [&] {
    sample_kernel<L><<<rows, kThreads, 0, stream>>>(static_cast<const L*>(logits), temperature,
                                                    top_k, top_p, min_p, seeds, out, vocab);
    return launch_status();
  });
}

int32_t top_k_distribution(int32_t logits_dtype, const void* logits, const float* temperature,
                           int32_t k, int32_t* out_ids, float* out_probs, int32_t rows,
                           int32_t vocab, cudaStream_t stream) {
  if (bad_rows(rows, vocab) || k < 1 || k > 1024 || k > vocab) return kBadArgument;
  if (rows == 0) return kOk;
  if (!logits || !out_ids || !out_probs) return kBadArgument;
  return PIE_DISPATCH_LOGITS(logits_dtype, L, [&] {
    top_k_distribution_kernel<L><<<rows, kThreads, 0, stream>>>(
        static_cast<const L*>(logits), temperature, k, out_ids, out_probs, vocab);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace pie
