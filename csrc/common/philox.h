#pragma once
// Counter-based dropout shared by every op (KERNELS.md): Philox-4x32-10 keyed by a 64-bit seed, counter =
// (element index / 4, offset); element e uses word e % 4 of its block. One definition for CPU and CUDA, so a
// seed gives the same mask on both, and the CPU tests exercise the math the GPU runs.
#include <cstdint>

#include "macros.h"

namespace peftops {

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

PEFTOPS_HOST_DEVICE Philox4 philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

PEFTOPS_HOST_DEVICE uint32_t philox_word(const Philox4& b, uint64_t lane) {
  return lane == 0 ? b.w0 : lane == 1 ? b.w1 : lane == 2 ? b.w2 : b.w3;
}

// An element is kept when its 32-bit word is >= p * 2^32 (u >= p with u = word / 2^32).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

struct Dropout {
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint32_t threshold = 0;
  bool active = false;
  double keep_scale = 1.0;  // 1 / (1 - p)

  PEFTOPS_HOST_DEVICE bool keep(uint64_t index) const {
    return philox_word(philox4x32_10(index >> 2, offset, seed), index & 3) >= threshold;
  }
};

}  // namespace peftops
