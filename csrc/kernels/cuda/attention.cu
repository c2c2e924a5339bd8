// Paged attention over ragged batches: a tensor-core prefill kernel (any query length, causal or
// bit-mask), a split-KV decode kernel (one query token per request, GQA heads of a KV head together),
// and the merge of decode chunks. Layouts and semantics: pie_cuda.h.
#include <atomic>

#include "common.cuh"

namespace pie {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct Seq {  // one request's KV sequence
  const int32_t* pages;  // (num_pages,) page ids
  int32_t kv_len;
};

__device__ __forceinline__ Seq load_seq(const int32_t* kv_page_indptr,
                                        const int32_t* kv_page_indices,
                                        const int32_t* kv_last_page_len, int32_t r,
                                        int32_t page_size) {
  const int32_t p0 = kv_page_indptr[r], p1 = kv_page_indptr[r + 1];
  Seq s;
  s.pages = kv_page_indices + p0;
  s.kv_len = p1 > p0 ? (p1 - p0 - 1) * page_size + kv_last_page_len[r] : 0;
  return s;
}

// Element offset of sequence index j, kv head h, in a (num_pages, page_size, H, D) cache.
__device__ __forceinline__ int64_t kv_offset(const Seq& s, int32_t j, int32_t page_size,
                                             int32_t num_kv_heads, int32_t h, int32_t head_dim) {
  const int64_t slot = int64_t(s.pages[j / page_size]) * page_size + j % page_size;
  return (slot * num_kv_heads + h) * head_dim;
}

__device__ __forceinline__ bool mask_bit(const uint32_t* row, int32_t j) {
  return (row[j >> 5] >> (j & 31)) & 1u;
}

// ------------------------------------------------------------------ tensor-core helpers (sm_80+)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// D (16x8 fp32) += A (16x16, row) * B (16x8, col). Fragment layouts (g = lane/4, t = lane%4):
//   a[0]: (g, 2t..2t+1)  a[1]: (g+8, 2t..)  a[2]: (g, 2t+8..)  a[3]: (g+8, 2t+8..)
//   b[0]: (k 2t..2t+1, n g)  b[1]: (k 2t+8.., n g)
//   d[0..1]: (g, 2t..2t+1)  d[2..3]: (g+8, 2t..2t+1)
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------ prefill
constexpr int kBlockM = 128;  // query rows per CTA: 8 warps x 16
constexpr int kBlockN = 64;   // KV tokens per tile
constexpr int kPrefillThreads = 256;
constexpr int kPrefillWarps = kPrefillThreads / 32;
static_assert(kBlockM == kPrefillWarps * 16, "one 16-row mma tile per warp");

// Dynamic shared memory of the prefill kernel: 2 stages x (K tile, V tile), each (kBlockN, D + 8).
template <int D>
constexpr int prefill_smem_bytes() {
  return 2 * 2 * kBlockN * (D + 8) * 2;
}

// Issue the 16-byte async copies of one K tile and one V tile (sequence indices kv0 .. kv0+63)
// into k_s / v_s; rows at or past kv_end are zero-filled (so P V never sees garbage).
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(T* k_s, T* v_s, const T* __restrict__ k_cache,
                                             const T* __restrict__ v_cache, const Seq& seq,
                                             int32_t kv0, int32_t kv_end, int32_t page_size,
                                             int32_t num_kv_heads, int32_t kvh) {
  constexpr int kStride = D + 8;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kPrefillThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int32_t j = kv0 + row;
    const bool valid = j < kv_end;
    const int64_t off = valid ? kv_offset(seq, j, page_size, num_kv_heads, kvh, D) + col : int64_t(0);
    cp_async16(&k_s[row * kStride + col], k_cache + off, valid);
    cp_async16(&v_s[row * kStride + col], v_cache + off, valid);
  }
  cp_async_commit();
}

// grid (num_work, num_q_heads), 256 threads. Each warp owns 16 query rows of the CTA's 128 and
// keeps S, P and O in registers (flash-attention 2 layout); K/V tiles of 64 tokens stream through a
// two-stage cp.async pipeline (the next tile loads while this one is computed).
template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads, 1)
    prefill_kernel(const T* __restrict__ q, T* __restrict__ out, const T* __restrict__ k_cache,
                   const T* __restrict__ v_cache, const int32_t* __restrict__ qo_indptr,
                   const int32_t* __restrict__ kv_page_indptr,
                   const int32_t* __restrict__ kv_page_indices,
                   const int32_t* __restrict__ kv_last_page_len,
                   const int32_t* __restrict__ work_req, const int32_t* __restrict__ work_tile,
                   const uint32_t* __restrict__ mask, const int32_t* __restrict__ mask_indptr,
                   int32_t page_size, int32_t num_q_heads, int32_t num_kv_heads,
                   float scale_log2) {
  constexpr int kStride = D + 8;  // smem row pitch in elements: 16-byte pad, conflict-free ldmatrix
  constexpr int kTileElems = kBlockN * kStride;
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  T* const smem = reinterpret_cast<T*>(prefill_smem);  // [stage][K, V][kBlockN][kStride]

  const int r = work_req[blockIdx.x], tile = work_tile[blockIdx.x];
  const int qh = blockIdx.y, kvh = qh / (num_q_heads / num_kv_heads);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  const int32_t q_begin = qo_indptr[r], qo_len = qo_indptr[r + 1] - q_begin;
  const Seq seq = load_seq(kv_page_indptr, kv_page_indices, kv_last_page_len, r, page_size);
  const int32_t kv_len = seq.kv_len;
  const int32_t kv_shift = kv_len - qo_len;  // sequence index of input token i is kv_shift + i
  const int32_t words_per_row = (kv_len + 31) >> 5;

  // This thread's two query rows (request-local indices), g and g + 8 of the warp's 16.
  const int32_t warp_row0 = tile * kBlockM + warp * 16;
  const bool warp_active = warp_row0 < qo_len;  // warps past the last row only help load
  const int32_t qi0 = warp_row0 + g, qi1 = qi0 + 8;
  const bool row_ok0 = qi0 < qo_len, row_ok1 = qi1 < qo_len;
  const uint32_t* mrow0 = nullptr;
  const uint32_t* mrow1 = nullptr;
  if (mask != nullptr) {
    mrow0 = mask + mask_indptr[r] + int64_t(row_ok0 ? qi0 : 0) * words_per_row;
    mrow1 = mask + mask_indptr[r] + int64_t(row_ok1 ? qi1 : 0) * words_per_row;
  }

  // Q fragments (rows qi0 / qi1, all D columns), read once from global memory.
  uint32_t qa[D / 16][4];
  {
    const int64_t hstride = int64_t(num_q_heads) * D;
    const uint32_t* q0 = reinterpret_cast<const uint32_t*>(
        q + (int64_t(q_begin) + (row_ok0 ? qi0 : 0)) * hstride + int64_t(qh) * D);
    const uint32_t* q1 = reinterpret_cast<const uint32_t*>(
        q + (int64_t(q_begin) + (row_ok1 ? qi1 : 0)) * hstride + int64_t(qh) * D);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qa[ks][0] = row_ok0 ? q0[ks * 8 + t4] : 0u;
      qa[ks][1] = row_ok1 ? q1[ks * 8 + t4] : 0u;
      qa[ks][2] = row_ok0 ? q0[ks * 8 + 4 + t4] : 0u;
      qa[ks][3] = row_ok1 ? q1[ks * 8 + 4 + t4] : 0u;
    }
  }

  float o[D / 8][4];  // output accumulator fragments, (16 rows, D) per warp
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain) of rows qi0, qi1
  float l0 = 0.f, l1 = 0.f;              // this thread's part of the running sums

  // KV range: causal CTAs stop after the last query row's own position.
  int32_t kv_end = kv_len;
  if (mask == nullptr) {
    const int32_t last_qi = min(qo_len, (tile + 1) * kBlockM) - 1;
    kv_end = min(kv_len, kv_shift + last_qi + 1);
  }
  // Tiles entirely below this index need no masking (causal, every row of the CTA sees them).
  const int32_t unmasked_end = mask == nullptr ? min(kv_end, kv_shift + tile * kBlockM + 1) : 0;
  const int num_tiles = (kv_end + kBlockN - 1) / kBlockN;

  if (num_tiles > 0)
    load_kv_tile<T, D>(smem, smem + kTileElems, k_cache, v_cache, seq, 0, kv_end, page_size,
                       num_kv_heads, kvh);
  for (int it = 0; it < num_tiles; ++it) {
    const int32_t kv0 = it * kBlockN;
    const T* k_s = smem + (it & 1) * 2 * kTileElems;
    const T* v_s = k_s + kTileElems;
    if (it + 1 < num_tiles) {  // prefetch the next tile into the other stage
      T* nk = smem + ((it + 1) & 1) * 2 * kTileElems;
      load_kv_tile<T, D>(nk, nk + kTileElems, k_cache, v_cache, seq, kv0 + kBlockN, kv_end,
                         page_size, num_kv_heads, kvh);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (warp_active) {
      // ---- S = Q K^T for the warp's 16 rows x 64 columns
      float s[kBlockN / 8][4];
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb) {
        s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks += 2) {
          // 4 matrices: K rows nb*8..+8, columns ks*16 + {0, 8, 16, 24} -> B fragments of ks, ks+1
          uint32_t b[4];
          ldmatrix_x4(b, &k_s[(nb * 8 + (lane & 7)) * kStride + ks * 16 + (lane >> 3) * 8]);
          mma16816<T>(s[nb], qa[ks], b[0], b[1]);
          mma16816<T>(s[nb], qa[ks + 1], b[2], b[3]);
        }
      }

      // ---- scale to the log2 domain, mask (boundary tiles only), online softmax
      float tmax0 = -INFINITY, tmax1 = -INFINITY;
      if (kv0 + kBlockN <= unmasked_end) {
#pragma unroll
        for (int nb = 0; nb < kBlockN / 8; ++nb) {
          s[nb][0] *= scale_log2; s[nb][1] *= scale_log2;
          s[nb][2] *= scale_log2; s[nb][3] *= scale_log2;
          tmax0 = fmaxf(tmax0, fmaxf(s[nb][0], s[nb][1]));
          tmax1 = fmaxf(tmax1, fmaxf(s[nb][2], s[nb][3]));
        }
      } else {
#pragma unroll
        for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int32_t j = kv0 + nb * 8 + t4 * 2 + (e & 1);
            const bool upper = e >= 2;
            const int32_t qi = upper ? qi1 : qi0;
            bool ok = (upper ? row_ok1 : row_ok0) && j < kv_end;
            if (ok) ok = mask == nullptr ? j <= kv_shift + qi : mask_bit(upper ? mrow1 : mrow0, j);
            const float v = ok ? s[nb][e] * scale_log2 : -INFINITY;
            s[nb][e] = v;
            if (upper) tmax1 = fmaxf(tmax1, v); else tmax0 = fmaxf(tmax0, v);
          }
        }
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, off));
        tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, off));
      }
      const float mnew0 = fmaxf(m0, tmax0), mnew1 = fmaxf(m1, tmax1);
      // A row with nothing visible yet keeps max -inf: use 0 as the base so exp2 gives 0, not NaN.
      const float base0 = mnew0 == -INFINITY ? 0.f : mnew0;
      const float base1 = mnew1 == -INFINITY ? 0.f : mnew1;
      const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
      m0 = mnew0;
      m1 = mnew1;
      l0 *= alpha0;
      l1 *= alpha1;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[i][0] *= alpha0; o[i][1] *= alpha0;
        o[i][2] *= alpha1; o[i][3] *= alpha1;
      }
      uint32_t pa[kBlockN / 16][4];  // P as A fragments of P V
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb) {
        const float p0 = exp2f(s[nb][0] - base0), p1 = exp2f(s[nb][1] - base0);
        const float p2 = exp2f(s[nb][2] - base1), p3 = exp2f(s[nb][3] - base1);
        l0 += p0 + p1;
        l1 += p2 + p3;
        // C fragments of n-blocks 2kk, 2kk+1 are exactly the A fragment of k-step kk.
        pa[nb >> 1][(nb & 1) * 2 + 0] = pack2<T>(p0, p1);
        pa[nb >> 1][(nb & 1) * 2 + 1] = pack2<T>(p2, p3);
      }

      // ---- O += P V
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
        for (int db = 0; db < D / 8; db += 2) {
          // 4 matrices: V rows kk*16 + {0..7, 8..15}, columns db*8 and (db+1)*8, transposed
          const int m = lane >> 3;
          uint32_t b[4];
          ldmatrix_x4_trans(
              b, &v_s[(kk * 16 + (m & 1) * 8 + (lane & 7)) * kStride + (db + (m >> 1)) * 8]);
          mma16816<T>(o[db], pa[kk], b[0], b[1]);
          mma16816<T>(o[db + 1], pa[kk], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // ---- normalise and store (rows with nothing visible write zeros)
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int64_t hstride = int64_t(num_q_heads) * D;
  uint32_t* out0 = reinterpret_cast<uint32_t*>(out + (int64_t(q_begin) + qi0) * hstride +
                                               int64_t(qh) * D);
  uint32_t* out1 = reinterpret_cast<uint32_t*>(out + (int64_t(q_begin) + qi1) * hstride +
                                               int64_t(qh) * D);
#pragma unroll
  for (int db = 0; db < D / 8; ++db) {
    if (row_ok0) out0[db * 4 + t4] = pack2<T>(o[db][0] * inv0, o[db][1] * inv0);
    if (row_ok1) out1[db * 4 + t4] = pack2<T>(o[db][2] * inv1, o[db][3] * inv1);
  }
}

// ------------------------------------------------------------------ decode
constexpr int kDecodeThreads = 128;
constexpr int kMaxGroup = 4;  // q heads per CTA sharing one KV head (larger groups: more CTAs)
constexpr int kUnroll = 4;    // tokens per slot per iteration: loads in flight before first use

// grid: (num_chunks, num_decode, num_kv_heads * head_groups). Lanes split the head dim in 16-byte
// pieces (D/8 lanes per token); each such lane group is a "slot" walking its own tokens with its
// own online softmax; slots merge through shared memory at the end.
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads, 4)
    decode_kernel(const T* __restrict__ q, T* __restrict__ out, const T* __restrict__ k_cache,
                  const T* __restrict__ v_cache, const int32_t* __restrict__ qo_indptr,
                  const int32_t* __restrict__ kv_page_indptr,
                  const int32_t* __restrict__ kv_page_indices,
                  const int32_t* __restrict__ kv_last_page_len,
                  const int32_t* __restrict__ decode_req, int32_t chunk_tokens,
                  float* __restrict__ part_o, float* __restrict__ part_lse,
                  const uint32_t* __restrict__ mask, const int32_t* __restrict__ mask_indptr,
                  int32_t page_size, int32_t num_q_heads, int32_t num_kv_heads,
                  int32_t head_groups, float scale_log2) {
  constexpr int kLanesPerTok = D / 8;
  constexpr int kSlots = kDecodeThreads / kLanesPerTok;  // 8 (D=128) or 16 (D=64)
  __shared__ float m_s[kSlots][kMaxGroup];
  __shared__ float l_s[kSlots][kMaxGroup];
  __shared__ float o_s[kSlots][kMaxGroup][D];

  const int chunk = blockIdx.x, di = blockIdx.y;
  const int kvh = blockIdx.z / head_groups, hg = blockIdx.z % head_groups;
  const int group = num_q_heads / num_kv_heads;
  const int qh0 = kvh * group + hg * kMaxGroup;
  const int nh = min(kMaxGroup, group - hg * kMaxGroup);  // q heads of this CTA
  const int slot = threadIdx.x / kLanesPerTok, sub = threadIdx.x % kLanesPerTok;

  const int32_t r = decode_req[di];
  const int32_t qrow = qo_indptr[r];
  const Seq seq = load_seq(kv_page_indptr, kv_page_indices, kv_last_page_len, r, page_size);
  const int32_t begin = chunk * chunk_tokens;
  const int32_t end = min(seq.kv_len, begin + chunk_tokens);
  const uint32_t* mrow = mask != nullptr ? mask + mask_indptr[r] : nullptr;

  float qf[kMaxGroup][8];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < nh) {
      const uint4 v = *reinterpret_cast<const uint4*>(
          q + (int64_t(qrow) * num_q_heads + qh0 + h) * D + sub * 8);
      unpack8<T>(v, qf[h]);
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[h][e] *= scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[h][e] = 0.f;
    }
  }
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
  }

  // Element offsets of this slot's kUnroll tokens of one iteration (-1: masked or past the end).
  // The next iteration's offsets are looked up while this iteration's K/V loads are in flight, so
  // the page-id load does not sit in front of every K/V load.
  auto lookup = [&](int32_t base, int64_t (&offs)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t j = base + u * kSlots + slot;
      bool ok = j < end;
      if (ok && mrow != nullptr) ok = mask_bit(mrow, j);
      offs[u] = ok ? kv_offset(seq, j, page_size, num_kv_heads, kvh, D) + sub * 8 : int64_t(-1);
    }
  };
  int64_t offs[kUnroll];
  lookup(begin, offs);
  for (int32_t base = begin; base < end; base += kSlots * kUnroll) {
    uint4 kv[kUnroll], vv[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = offs[u] >= 0;
      if (ok[u]) {
        kv[u] = __ldg(reinterpret_cast<const uint4*>(k_cache + offs[u]));
        vv[u] = __ldg(reinterpret_cast<const uint4*>(v_cache + offs[u]));
      } else {
        kv[u] = vv[u] = make_uint4(0, 0, 0, 0);
      }
    }
    lookup(base + kSlots * kUnroll, offs);  // all -1 past the end
    float sc[kUnroll][kMaxGroup];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      unpack8<T>(kv[u], kf);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[h][e], kf[e], d);
#pragma unroll
        for (int off = 1; off < kLanesPerTok; off <<= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        sc[u][h] = ok[u] ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      float mn = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mn = fmaxf(mn, sc[u][h]);
      const float b = mn == -INFINITY ? 0.f : mn;
      const float alpha = exp2f(m[h] - b);
      m[h] = mn;
      l[h] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float p = exp2f(sc[u][h] - b);
        l[h] += p;
        float vf[8];
        unpack8<T>(vv[u], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
      }
    }
  }

  // ---- merge the slots
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (sub == 0) {
      m_s[slot][h] = m[h];
      l_s[slot][h] = l[h];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) o_s[slot][h][sub * 8 + e] = acc[h][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * D; idx += kDecodeThreads) {
    const int h = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) mx = fmaxf(mx, m_s[s][h]);
    const float b = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, osum = 0.f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const float w = exp2f(m_s[s][h] - b);
      lsum += l_s[s][h] * w;
      osum += o_s[s][h][d] * w;
    }
    const float val = lsum > 0.f ? osum / lsum : 0.f;
    const int qh = qh0 + h;
    if (part_o == nullptr) {
      out[(int64_t(qrow) * num_q_heads + qh) * D + d] = from_float<T>(val);
    } else {
      const int64_t row = (int64_t(chunk) * gridDim.y + di) * num_q_heads + qh;
      part_o[row * D + d] = val;
      if (d == 0) part_lse[row] = lsum > 0.f ? b + log2f(lsum) : -INFINITY;
    }
  }
}

// grid (num_decode, num_q_heads), block D threads: out = sum_c w_c o_c, w_c ~ 2^lse_c.
template <typename T>
__global__ void merge_chunks_kernel(const float* __restrict__ part_o,
                                    const float* __restrict__ part_lse, T* __restrict__ out,
                                    const int32_t* __restrict__ qo_indptr,
                                    const int32_t* __restrict__ decode_req, int32_t num_chunks,
                                    int32_t num_q_heads, int32_t head_dim) {
  const int di = blockIdx.x, qh = blockIdx.y, d = threadIdx.x;
  const int num_decode = gridDim.x;
  float mx = -INFINITY;
  for (int c = 0; c < num_chunks; ++c)
    mx = fmaxf(mx, part_lse[(int64_t(c) * num_decode + di) * num_q_heads + qh]);
  float wsum = 0.f, osum = 0.f;
  if (mx != -INFINITY) {
    for (int c = 0; c < num_chunks; ++c) {
      const int64_t row = (int64_t(c) * num_decode + di) * num_q_heads + qh;
      const float w = exp2f(part_lse[row] - mx);
      wsum += w;
      osum += w * part_o[row * head_dim + d];
    }
  }
  const int32_t qrow = qo_indptr[decode_req[di]];
  out[(int64_t(qrow) * num_q_heads + qh) * head_dim + d] =
      from_float<T>(wsum > 0.f ? osum / wsum : 0.f);
}

// ------------------------------------------------------------------ BRLE -> bits
// One thread per row, walking its runs and emitting 32-bit words in order.
__global__ void expand_brle_bits_kernel(const int32_t* __restrict__ runs,
                                        const int64_t* __restrict__ run_offsets,
                                        int32_t num_rows, const int32_t* __restrict__ row_len,
                                        const int32_t* __restrict__ row_word_offset,
                                        uint32_t* __restrict__ out, int32_t* bad_rows) {
  const int32_t row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  const int32_t n = row_len[row];
  uint32_t* dst = out + row_word_offset[row];
  const int32_t num_words = (n + 31) >> 5;
  int64_t pos = 0;  // bits emitted so far
  uint32_t word = 0;
  int32_t w = 0;  // next word to store
  bool bad = false;
  bool attend = true;
  for (int64_t i = run_offsets[row]; i < run_offsets[row + 1]; ++i, attend = !attend) {
    int64_t len = runs[i];
    if (len < 0) { bad = true; len = 0; }
    if (pos + len > n) { bad = true; len = n - pos; }
    while (len > 0) {
      const int bit = int(pos & 31);
      const int take = int(len < 32 - bit ? len : int64_t(32 - bit));
      if (attend) word |= (take == 32 ? 0xffffffffu : ((1u << take) - 1u)) << bit;
      pos += take;
      len -= take;
      if ((pos & 31) == 0) { dst[w++] = word; word = 0; }
    }
  }
  if (pos != n) bad = true;
  if (pos & 31) dst[w++] = word;
  for (; w < num_words; ++w) dst[w] = 0u;  // rows shorter than n: the rest hidden
  if (bad && bad_rows != nullptr) atomicAdd(bad_rows, 1);
}

bool supported_head_dim(int32_t d) { return d == 64 || d == 128; }

// Launch prefill_kernel<T, D>, first allowing its > 48 KB of dynamic shared memory (once per device).
template <typename T, int D, typename... Args>
int32_t launch_prefill(dim3 grid, cudaStream_t stream, Args... args) {
  constexpr int kSmem = prefill_smem_bytes<D>();
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> ready[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices)
    return kLaunchFailed;
  if (!ready[device].load(std::memory_order_acquire)) {
    if (cudaFuncSetAttribute(prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmem) != cudaSuccess)
      return kLaunchFailed;
    ready[device].store(true, std::memory_order_release);
  }
  prefill_kernel<T, D><<<grid, kPrefillThreads, kSmem, stream>>>(args...);
  return launch_status();
}

bool valid_heads(int32_t num_q_heads, int32_t num_kv_heads) {
  return num_q_heads > 0 && num_kv_heads > 0 && num_q_heads % num_kv_heads == 0;
}

}  // namespace

int32_t paged_prefill_attention(int32_t dtype, const void* q, void* out, const void* k_cache,
                                const void* v_cache, const int32_t* qo_indptr,
                                const int32_t* kv_page_indptr, const int32_t* kv_page_indices,
                                const int32_t* kv_last_page_len, const int32_t* work_req,
                                const int32_t* work_tile, int32_t num_work, const uint32_t* mask,
                                const int32_t* mask_indptr, int32_t page_size, int32_t num_q_heads,
                                int32_t num_kv_heads, int32_t head_dim, float sm_scale,
                                cudaStream_t stream) {
  if (!supported_head_dim(head_dim)) return kUnsupportedHeadDim;
  if (!valid_heads(num_q_heads, num_kv_heads) || page_size <= 0 || num_work < 0 ||
      num_q_heads > 65535)
    return kBadArgument;
  if (num_work == 0) return kOk;
  if (!q || !out || !k_cache || !v_cache || !qo_indptr || !kv_page_indptr || !kv_page_indices ||
      !kv_last_page_len || !work_req || !work_tile || (mask != nullptr) != (mask_indptr != nullptr))
    return kBadArgument;
  const dim3 grid(num_work, num_q_heads);
  const float scale_log2 = sm_scale * kLog2e;
  return PIE_DISPATCH_DTYPE(dtype, T, [&] {
    const T* qp = static_cast<const T*>(q);
    T* op = static_cast<T*>(out);
    const T* kp = static_cast<const T*>(k_cache);
    const T* vp = static_cast<const T*>(v_cache);
    if (head_dim == 64)
      return launch_prefill<T, 64>(grid, stream, qp, op, kp, vp, qo_indptr, kv_page_indptr,
                                   kv_page_indices, kv_last_page_len, work_req, work_tile, mask,
                                   mask_indptr, page_size, num_q_heads, num_kv_heads, scale_log2);
    return launch_prefill<T, 128>(grid, stream, qp, op, kp, vp, qo_indptr, kv_page_indptr,
                                  kv_page_indices, kv_last_page_len, work_req, work_tile, mask,
                                  mask_indptr, page_size, num_q_heads, num_kv_heads, scale_log2);
  });
}

int32_t paged_decode_attention(int32_t dtype, const void* q, void* out, const void* k_cache,
                               const void* v_cache, const int32_t* qo_indptr,
                               const int32_t* kv_page_indptr, const int32_t* kv_page_indices,
                               const int32_t* kv_last_page_len, const int32_t* decode_req,
                               int32_t num_decode, int32_t num_chunks, int32_t chunk_tokens,
                               float* part_o, float* part_lse, const uint32_t* mask,
                               const int32_t* mask_indptr, int32_t page_size, int32_t num_q_heads,
                               int32_t num_kv_heads, int32_t head_dim, float sm_scale,
                               cudaStream_t stream) {
  if (!supported_head_dim(head_dim)) return kUnsupportedHeadDim;
  if (!valid_heads(num_q_heads, num_kv_heads) || page_size <= 0 || num_decode < 0 ||
      num_chunks <= 0 || chunk_tokens <= 0 || num_decode > 65535)
    return kBadArgument;
  if (num_decode == 0) return kOk;
  if (!q || !out || !k_cache || !v_cache || !qo_indptr || !kv_page_indptr || !kv_page_indices ||
      !kv_last_page_len || !decode_req || (mask != nullptr) != (mask_indptr != nullptr))
    return kBadArgument;
  if (num_chunks > 1 && (part_o == nullptr || part_lse == nullptr)) return kWorkspaceTooSmall;
  const int32_t group = num_q_heads / num_kv_heads;
  const int32_t head_groups = (group + kMaxGroup - 1) / kMaxGroup;
  if (int64_t(num_kv_heads) * head_groups > 65535) return kBadArgument;
  const dim3 grid(num_chunks, num_decode, num_kv_heads * head_groups);
  const float scale_log2 = sm_scale * kLog2e;
  float* po = num_chunks > 1 ? part_o : nullptr;
  float* pl = num_chunks > 1 ? part_lse : nullptr;
  return PIE_DISPATCH_DTYPE(dtype, T, [&] {
    auto run = [&](auto kernel) {
      kernel<<<grid, kDecodeThreads, 0, stream>>>(
          static_cast<const T*>(q), static_cast<T*>(out), static_cast<const T*>(k_cache),
          static_cast<const T*>(v_cache), qo_indptr, kv_page_indptr, kv_page_indices,
          kv_last_page_len, decode_req, chunk_tokens, po, pl, mask, mask_indptr, page_size,
          num_q_heads, num_kv_heads, head_groups, scale_log2);
      return launch_status();
    };
    int32_t err = head_dim == 64 ? run(decode_kernel<T, 64>) : run(decode_kernel<T, 128>);
    if (err != kOk || num_chunks == 1) return err;
    merge_chunks_kernel<T><<<dim3(num_decode, num_q_heads), head_dim, 0, stream>>>(
        part_o, part_lse, static_cast<T*>(out), qo_indptr, decode_req, num_chunks, num_q_heads,
        head_dim);
    return launch_status();
  });
}

int32_t expand_brle_bits(const int32_t* runs, const int64_t* run_offsets, int32_t num_rows,
                         const int32_t* row_len, const int32_t* row_word_offset, uint32_t* out,
                         int32_t* bad_rows, cudaStream_t stream) {
  if (num_rows < 0) return kBadArgument;
  if (num_rows == 0) return kOk;
  if (!run_offsets || !row_len || !row_word_offset || !out) return kBadArgument;
  constexpr int kThreads = 128;
  expand_brle_bits_kernel<<<(num_rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      runs, run_offsets, num_rows, row_len, row_word_offset, out, bad_rows);
  return launch_status();
}

}  // namespace cuda
}  // namespace pie
