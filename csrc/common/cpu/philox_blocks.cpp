// Philox words for the CPU dropout masks, bit-identical to philox4x32_10 (common/philox.h), many blocks per
// instruction: 16 with AVX-512 (chosen at run time, as ATen chooses its kernels, so ATEN_CPU_CAPABILITY=avx2
// turns it off), 8 with AVX2 (when the build targets it), the tail scalar. 32-bit mulhi is two even/odd
// 32x32->64 products; the lanes hold word j of consecutive blocks and are transposed back to element order.
#include "philox_blocks.h"

#include <ATen/Version.h>

#include <climits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace peftops::cpu {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u, kKey0 = 0x9E3779B9u, kKey1 = 0xBB67AE85u;

uint64_t philox_scalar(uint64_t g0, uint64_t groups, uint64_t offset, uint64_t seed, uint32_t* w) {
  for (uint64_t g = 0; g < groups; ++g) {
    const Philox4 b = philox4x32_10(g0 + g, offset, seed);
    w[4 * g] = b.w0, w[4 * g + 1] = b.w1, w[4 * g + 2] = b.w2, w[4 * g + 3] = b.w3;
  }
  return groups;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define PEFTOPS_HAVE_AVX512_PATH 1

__attribute__((target("avx512f"))) inline __m512i mulhi512(__m512i a, __m512i m) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

// Whole runs of 16 blocks; returns how many blocks it wrote.
__attribute__((target("avx512f"))) uint64_t philox_avx512(uint64_t g0, uint64_t groups, uint64_t offset,
                                                          uint64_t seed, uint32_t* w) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kMul0)), m1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  uint64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const uint64_t base = g0 + g;
    const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    __m512i c0 = _mm512_add_epi32(lo, lanes);
    // the counter's high word, plus one in the lanes whose low word wrapped (c0 < base, unsigned)
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i hi0 = mulhi512(c0, m0), lo0 = _mm512_mullo_epi32(c0, m0);
      const __m512i hi1 = mulhi512(c2, m1), lo1 = _mm512_mullo_epi32(c2, m1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1, c3 = lo0;
      k0 += kKey0, k1 += kKey1;
    }
    // Within each 128-bit lane: u_j holds block j, j + 4, j + 8, j + 12 (one per lane) in element order ...
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    // ... then a 4 x 4 transpose of the 128-bit lanes puts blocks 4i .. 4i + 3 in output register i.
    const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* out = w + 4 * g;
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(v0, v1, 0x88));
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
  }
  return g;
}

bool use_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return yes;
}
#endif

#ifdef __AVX2__
inline __m256i mulhi256(__m256i a, __m256i m) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(even, odd, 0xAA);
}

// Whole runs of 8 blocks; returns how many blocks it wrote.
uint64_t philox_avx2(uint64_t g0, uint64_t groups, uint64_t offset, uint64_t seed, uint32_t* w) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0)), m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), sign = _mm256_set1_epi32(INT32_MIN);
  uint64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const uint64_t base = g0 + g;
    const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    __m256i c0 = _mm256_add_epi32(lo, lanes);
    // the counter's high word, plus one in the lanes whose low word wrapped (unsigned c0 < base)
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))),
                                  _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0, sign)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i hi0 = mulhi256(c0, m0), lo0 = _mm256_mullo_epi32(c0, m0);
      const __m256i hi1 = mulhi256(c2, m1), lo1 = _mm256_mullo_epi32(c2, m1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1, c3 = lo0;
      k0 += kKey0, k1 += kKey1;
    }
    // 4 x 8 transpose: register j holds word j of blocks 0..7; out holds blocks 2i, 2i + 1 in element order
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* out = reinterpret_cast<__m256i*>(w + 4 * g);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  return g;
}
#endif

}  // namespace

void philox_blocks(uint64_t g0, uint64_t groups, uint64_t offset, uint64_t seed, uint32_t* w) {
  uint64_t done = 0;
#ifdef PEFTOPS_HAVE_AVX512_PATH
  if (use_avx512()) done = philox_avx512(g0, groups, offset, seed, w);
#endif
#ifdef __AVX2__
  done += philox_avx2(g0 + done, groups - done, offset, seed, w + 4 * done);
#endif
  philox_scalar(g0 + done, groups - done, offset, seed, w + 4 * done);
}

}  // namespace peftops::cpu
