#pragma once
// CPU building blocks shared by the op families: the per-row dropout mask (the Philox of common/philox.h), a masked
// row update, and a parallel pass over rows that reduces columns in the same pass (bias and scale gradients).
// Rank-r products are left to the vendor GEMMs, which beat hand-written tiles here (BENCHMARKS.md).
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "philox_blocks.h"

namespace peftops::cpu {

// keep[k] = dropout scale of element (row, k) of a [rows, cols] matrix: 0 or 1/(1-p).
template <typename acc_t>
void row_keep(const Dropout& d, int64_t row, int64_t cols, acc_t* keep) {
  const uint64_t first = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
  const uint64_t g0 = first >> 2, groups = ((first + cols + 3) >> 2) - g0;
  thread_local std::vector<uint32_t> words;
  words.resize(4 * groups);
  philox_blocks(g0, groups, d.offset, d.seed, words.data());
  const auto scale = static_cast<acc_t>(d.keep_scale);
  const uint32_t* mine = words.data() + (first & 3);
  for (int64_t k = 0; k < cols; ++k) keep[k] = mine[k] >= d.threshold ? scale : acc_t(0);
}

// dst[0:K] = keep o src, plus dst itself when accumulating, in the accumulation type (scratch: 2 K values). src and
// dst may differ in type (16-bit rows into float blocks and back); with no conversions it is one vectorised loop.
template <typename src_t, typename dst_t, typename acc_t>
void masked_row(const acc_t* keep, const src_t* src, dst_t* dst, int64_t K, bool accumulate, acc_t* scratch) {
  const acc_t* in = nullptr;
  if constexpr (std::is_same_v<src_t, acc_t>) {
    in = src;
  } else {
    at::vec::convert(src, scratch, K);
    in = scratch;
  }
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    if (accumulate) {
      for (int64_t k = 0; k < K; ++k) dst[k] += keep[k] * in[k];
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k] = keep[k] * in[k];
    }
  } else {
    acc_t* row = scratch + K;
    if (accumulate) {
      at::vec::convert(dst, row, K);
      for (int64_t k = 0; k < K; ++k) row[k] += keep[k] * in[k];
    } else {
      for (int64_t k = 0; k < K; ++k) row[k] = keep[k] * in[k];
    }
    at::vec::convert(row, dst, K);
  }
}

// This thread's slot among `slots` per-thread buffers allocated before a parallel_for. Called from inside another
// parallel region, the loop runs inline on a thread whose number may exceed the slots: it has them all to itself.
inline int64_t thread_slot(int64_t slots) { return std::min<int64_t>(at::get_thread_num(), slots - 1); }

// Runs row(n, partial) for every row n of an [N, K] problem in parallel; each thread adds into its own zeroed
// `width` accumulators, which are summed into sums[0:width] at the end (column reductions in one pass).
template <typename acc_t, typename RowFn>
void rows_reducing(int64_t N, int64_t K, int64_t width, acc_t* sums, const RowFn& row) {
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> partials(static_cast<size_t>(nthreads) * width, acc_t(0));
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K)), [&](int64_t begin, int64_t end) {
    acc_t* part = partials.data() + thread_slot(nthreads) * width;
    for (int64_t n = begin; n < end; ++n) row(n, part);
  });
  for (int64_t i = 0; i < width; ++i) {
    acc_t sum = 0;
    for (int t = 0; t < nthreads; ++t) sum += partials[t * width + i];
    sums[i] = sum;
  }
}

// Rows of a 2-D matrix with unit column stride, or one column (a copy only when the view has neither).
inline at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

}  // namespace peftops::cpu
