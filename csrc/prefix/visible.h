#pragma once
// Which sequence keys a query row sees, one definition for the CPU and CUDA kernels: keys [0, end(l)) (causality
// aligned to the end of the sequence, so L queries decoded against S >= L cached keys see what they should) minus
// padding. The prefix keys are always visible.
#include <cstdint>

#include "../common/macros.h"

namespace peftops::prefix {

struct Visible {
  int64_t L, S;
  bool causal;
  const bool* mask;  // [B, S] contiguous (True = attend), or null; on the device of the kernel that reads it

  // row l sees the sequence keys j < end(l) that its padding does not hide
  PEFTOPS_HOST_DEVICE int64_t end(int64_t l) const {
    if (!causal) return S;
    const int64_t e = l + S - L + 1;
    return e < 0 ? 0 : (e > S ? S : e);
  }
  // the first query row that sequence key j is visible to (its causal side; padding aside)
  PEFTOPS_HOST_DEVICE int64_t first_row(int64_t j) const {
    const int64_t r = j - S + L;
    return causal && r > 0 ? r : 0;
  }
  PEFTOPS_HOST_DEVICE const bool* row(int64_t b) const { return mask ? mask + b * S : nullptr; }
  PEFTOPS_HOST_DEVICE bool sees(int64_t b, int64_t l, int64_t j) const {
    return j < end(l) && (mask == nullptr || mask[b * S + j]);
  }
};

}  // namespace peftops::prefix
