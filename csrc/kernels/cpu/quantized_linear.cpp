#include "cpu/quantized_linear.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/brle.h"
#include "cpu/quantized_dot.h"
#include "cpu/thread_pool.h"

namespace pie {

namespace {

constexpr int kSuperRows = 4 * kQuantTileRows;  // weight rows unpacked at once per thread
constexpr int64_t kXChunk = 32;                  // rows of x per pass over a super tile (stays in L1/L2)

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Unpackers: one row of K values from its ggml blocks `src` into q (K,) u8 and, per 16 values, a and b
// (K / 16,) with w = a * q + b.
void unpack_q8_0(const uint8_t* src, int64_t k, uint8_t* q, float* a, float* b) {
  for (int64_t blk = 0; blk < k / 32; ++blk) {
    const uint8_t* p = src + blk * 34;  // d fp16, q int8[32]
    const float d = f16(p);
    for (int j = 0; j < 32; ++j) q[32 * blk + j] = static_cast<uint8_t>(p[2 + j] ^ 0x80);  // q + 128
    a[2 * blk] = a[2 * blk + 1] = d;
    b[2 * blk] = b[2 * blk + 1] = -128.0f * d;
  }
}

inline void nibbles(const uint8_t* qs, uint8_t* q) {  // 16 bytes -> 32 values: low nibbles, then high
  for (int j = 0; j < 16; ++j) {
    q[j] = qs[j] & 0x0F;
    q[16 + j] = qs[j] >> 4;
  }
}

void unpack_q4_0(const uint8_t* src, int64_t k, uint8_t* q, float* a, float* b) {
  for (int64_t blk = 0; blk < k / 32; ++blk) {
    const uint8_t* p = src + blk * 18;  // d fp16, qs u8[16]
    const float d = f16(p);
    nibbles(p + 2, q + 32 * blk);
    a[2 * blk] = a[2 * blk + 1] = d;
    b[2 * blk] = b[2 * blk + 1] = -8.0f * d;
  }
}

void unpack_q4_1(const uint8_t* src, int64_t k, uint8_t* q, float* a, float* b) {
  for (int64_t blk = 0; blk < k / 32; ++blk) {
    const uint8_t* p = src + blk * 20;  // d fp16, m fp16, qs u8[16]
    const float d = f16(p), mn = f16(p + 2);
    nibbles(p + 4, q + 32 * blk);
    a[2 * blk] = a[2 * blk + 1] = d;
    b[2 * blk] = b[2 * blk + 1] = mn;
  }
}

void unpack_q4_k(const uint8_t* src, int64_t k, uint8_t* q, float* a, float* b) {
  for (int64_t blk = 0; blk < k / 256; ++blk) {
    const uint8_t* p = src + blk * 144;  // d fp16, dmin fp16, scales u8[12], qs u8[128]
    const float d = f16(p), dmin = f16(p + 2);
    const uint8_t* s = p + 4;
    const uint8_t* qs = p + 16;
    uint8_t* out = q + 256 * blk;
    for (int j = 0; j < 8; ++j) {  // sub-block j: values 32 j .. 32 j + 31
      int sc, mn;
      if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
      } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      }
      const int64_t g = 16 * blk + 2 * j;
      a[g] = a[g + 1] = d * static_cast<float>(sc);
      b[g] = b[g + 1] = -dmin * static_cast<float>(mn);
    }
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        out[64 * c + l] = qs[32 * c + l] & 0x0F;
        out[64 * c + 32 + l] = qs[32 * c + l] >> 4;
      }
  }
}

void unpack_q6_k(const uint8_t* src, int64_t k, uint8_t* q, float* a, float* b) {
  for (int64_t blk = 0; blk < k / 256; ++blk) {
    const uint8_t* p = src + blk * 210;  // ql u8[128], qh u8[64], scales int8[16], d fp16
    const float d = f16(p + 208);
    for (int g = 0; g < 16; ++g) {
      const float sc = d * static_cast<float>(static_cast<int8_t>(p[192 + g]));
      a[16 * blk + g] = sc;
      b[16 * blk + g] = -32.0f * sc;
    }
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = p + 64 * h;
      const uint8_t* qh = p + 128 + 32 * h;
      uint8_t* out = q + 256 * blk + 128 * h;
      for (int l = 0; l < 32; ++l) {
        out[l] = static_cast<uint8_t>((ql[l] & 0x0F) | ((qh[l] & 3) << 4));
        out[32 + l] = static_cast<uint8_t>((ql[32 + l] & 0x0F) | (((qh[l] >> 2) & 3) << 4));
        out[64 + l] = static_cast<uint8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
        out[96 + l] = static_cast<uint8_t>((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4));
      }
    }
  }
}

using UnpackFn = void (*)(const uint8_t*, int64_t, uint8_t*, float*, float*);

struct TypeInfo {
  int64_t values, bytes;
  UnpackFn unpack;
};

bool type_info(int32_t qtype, TypeInfo* info) {
  switch (qtype) {
    case kQ8_0: *info = {32, 34, unpack_q8_0}; return true;
    case kQ4_0: *info = {32, 18, unpack_q4_0}; return true;
    case kQ4_1: *info = {32, 20, unpack_q4_1}; return true;
    case kQ4_K: *info = {256, 144, unpack_q4_k}; return true;
    case kQ6_K: *info = {256, 210, unpack_q6_k}; return true;
    default: return false;
  }
}

// One row of x (K,) -> xq (Kp,) int16 per block of 32 (scale amax / 32767, round to nearest; zero padding),
// xd (Kp / 16,) the scale per 16 values, xs (Kp / 16,) scale * sum of xq per 16 values.
void quantize_row(const float* x, int64_t k, int64_t kp, int16_t* xq, float* xd, float* xs) {
  for (int64_t c = 0; c < kp; c += 32) {
    const int64_t len = std::max<int64_t>(0, std::min<int64_t>(32, k - c));
    float amax = 0.0f;
    for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(x[c + j]));
    const float d = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    int sums[2] = {0, 0};
    for (int64_t j = 0; j < 32; ++j) {
      const int v = j < len ? static_cast<int>(std::nearbyint(x[c + j] * inv)) : 0;
      xq[c + j] = static_cast<int16_t>(std::max(-32767, std::min(32767, v)));
      sums[j / 16] += xq[c + j];
    }
    for (int h = 0; h < 2; ++h) {
      xd[c / 16 + h] = d;
      xs[c / 16 + h] = d * static_cast<float>(sums[h]);
    }
  }
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

}  // namespace

uint32_t quantized_isas() {
  static const uint32_t isas = (1u << kIsaAvx2) | (cpu_has_avx512() ? 1u << kIsaAvx512 : 0u);
  return isas;
}

int32_t quantized_linear(int32_t qtype, const float* x, const uint8_t* w, const float* bias, float* y, int64_t m,
                         int64_t n, int64_t k, int32_t isa) {
  TypeInfo info;
  if (!type_info(qtype, &info) || m < 1 || n < 1 || k < 1 || k % info.values || !x || !w || !y) return kBadArgument;
  // AVX2 by default: on the AMD EPYC (Zen 4) measured, the AVX-512 kernel is slower (its 512-bit ops are
  // double-pumped and its per-2-value scales cost more loads); it stays selectable and tested.
  if (isa == kIsaAuto) isa = kIsaAvx2;
  if (isa < 0 || isa > kIsaAvx512 || !(quantized_isas() & (1u << isa))) return kBadArgument;
  const bool wide = isa == kIsaAvx512;  // its scales are expanded per 2 values
  const QuantDotFn dot = wide ? quant_dot_avx512 : quant_dot_avx2;
  const int64_t kp = (k + 63) / 64 * 64, groups = kp / 16, lanes = kp / 2;
  const int64_t row_bytes = k / info.values * info.bytes;

  // x, quantized once: xq (M, Kp), xd16 / xs16 (M, Kp / 16), xd2 (M, Kp / 2) for the AVX-512 kernel
  std::vector<int16_t> xq(static_cast<size_t>(m * kp));
  std::vector<float> xd16(static_cast<size_t>(m * groups)), xs16(static_cast<size_t>(m * groups));
  std::vector<float> xd2(wide ? static_cast<size_t>(m * lanes) : 0);
  ThreadPool::instance().run(static_cast<int>(std::max<int64_t>(1, m / 8)), [&](int share, int shares) {
    for (int64_t i = share; i < m; i += shares) {
      quantize_row(x + i * k, k, kp, xq.data() + i * kp, xd16.data() + i * groups, xs16.data() + i * groups);
      if (wide)
        for (int64_t g = 0; g < groups; ++g)
          for (int j = 0; j < 8; ++j) xd2[(i * groups + g) * 8 + j] = xd16[i * groups + g];
    }
  });

  const int64_t num_super = (n + kSuperRows - 1) / kSuperRows;
  ThreadPool::instance().run(static_cast<int>(num_super), [&](int share, int shares) {
    // per thread: a super tile of kSuperRows weight rows, unpacked (layout of quantized_dot.h)
    thread_local std::vector<uint8_t> wq;
    thread_local std::vector<float> wa, wb, wa2, part;
    wq.assign(static_cast<size_t>(kSuperRows * kp), 0);
    wa.assign(static_cast<size_t>(kSuperRows * groups), 0.0f);
    wb.assign(static_cast<size_t>(kSuperRows * groups), 0.0f);
    wa2.assign(wide ? static_cast<size_t>(kSuperRows * lanes) : 0, 0.0f);
    part.resize(static_cast<size_t>(kQuantTileRows * kXChunk));
    const int64_t per = (num_super + shares - 1) / shares;
    const int64_t s_end = std::min(num_super, (share + 1) * per);
    for (int64_t s = share * per; s < s_end; ++s) {
      const int64_t row0 = s * kSuperRows;
      const int rows = static_cast<int>(std::min<int64_t>(kSuperRows, n - row0));
      for (int r = 0; r < rows; ++r)
        info.unpack(w + (row0 + r) * row_bytes, k, wq.data() + r * kp, wa.data() + r * groups, wb.data() + r * groups);
      if (rows < kSuperRows) {  // rows past N compute zeros that are never stored
        std::fill(wq.begin() + rows * kp, wq.end(), 0);
        std::fill(wa.begin() + rows * groups, wa.end(), 0.0f);
      }
      if (wide)  // wa2[r, l] = wa[r, l / 8]
        for (int64_t g = 0; g < kSuperRows * groups; ++g)
          for (int j = 0; j < 8; ++j) wa2[g * 8 + j] = wa[g];
      for (int64_t i0 = 0; i0 < m; i0 += kXChunk) {
        const int64_t mc = std::min(kXChunk, m - i0);
        for (int t = 0; t * kQuantTileRows < rows; ++t) {
          const int tr = std::min(kQuantTileRows, rows - t * kQuantTileRows);
          const int64_t r0 = t * kQuantTileRows;
          dot(wq.data() + r0 * kp, wide ? wa2.data() + r0 * lanes : wa.data() + r0 * groups, tr,
              xq.data() + i0 * kp, wide ? xd2.data() + i0 * lanes : xd16.data() + i0 * groups, mc, kp, part.data());
          for (int r = 0; r < tr; ++r) {
            const float* b = wb.data() + (r0 + r) * groups;
            const int64_t col = row0 + r0 + r;
            for (int64_t i = 0; i < mc; ++i) {
              const float* xs = xs16.data() + (i0 + i) * groups;
              float acc8[8] = {};  // sum over groups of b * scale * sum(xq): the w = a q + b offsets
              for (int64_t g = 0; g < groups; g += 8)  // groups = Kp / 16 is a multiple of 4
                for (int j = 0; j < 8 && g + j < groups; ++j) acc8[j] += b[g + j] * xs[g + j];
              float offset = 0.0f;
              for (float v : acc8) offset += v;
              const float v = part[r * mc + i] + offset;
              y[(i0 + i) * n + col] = bias ? v + bias[col] : v;
            }
          }
        }
      }
    }
  });
  return kOk;
}

}  // namespace pie
