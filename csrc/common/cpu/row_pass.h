#pragma once
// CPU building blocks shared by the op families: the per-row dropout mask (the Philox of common/philox.h) and a
// vectorised pass over tiles of rows that reads a [N, K] matrix X once and yields any of
//   X M  [N, r]  (rank-r shrink),   X^T V  [K, r]  (rank-r weight gradient),
// and adds  alpha * mask o (V E)  into a [N, K] matrix Y in place (rank-r expand), one mask per tile.
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "philox_blocks.h"

namespace peftops::cpu {

// Register tiles: kTileRows rows at a time, the rank in chunks of two vectors (16 floats with AVX2); rank-r
// operands are zero-padded to whole chunks so no loop has a tail over r.
constexpr int64_t kTileRows = 4;

template <typename acc_t>
constexpr int64_t chunk() { return 2 * at::vec::Vectorized<acc_t>::size(); }

template <typename acc_t>
int64_t padded_rank(int64_t r) { return (r + chunk<acc_t>() - 1) / chunk<acc_t>() * chunk<acc_t>(); }

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

// dst[0:K] = keep o src, plus dst itself when accumulating, in the accumulation type (scratch: 2 K values).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void masked_row(const acc_t* keep, const scalar_t* src, scalar_t* dst, int64_t K, bool accumulate, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {  // no conversions: one loop the compiler vectorises
    if (accumulate) {
      for (int64_t k = 0; k < K; ++k) dst[k] += keep[k] * src[k];
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k] = keep[k] * src[k];
    }
  } else {
    acc_t *row = scratch, *base = scratch + K;
    at::vec::convert(src, row, K);
    if (accumulate) {
      at::vec::convert(dst, base, K);
      for (int64_t k = 0; k < K; ++k) row[k] = base[k] + keep[k] * row[k];
    } else {
      for (int64_t k = 0; k < K; ++k) row[k] *= keep[k];
    }
    at::vec::convert(row, dst, K);
  }
}

// dst[0:n] += add[0:n], converting through the accumulation type.
template <typename scalar_t, typename acc_t>
inline void add_into(scalar_t* dst, const acc_t* add, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t k = 0; k < n; ++k) dst[k] += add[k];
  } else {
    acc_t tmp[chunk<acc_t>()];
    at::vec::convert(dst, tmp, n);
    for (int64_t k = 0; k < n; ++k) tmp[k] += add[k];
    at::vec::convert(tmp, dst, n);
  }
}

template <typename scalar_t>
struct RowPass {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t N = 0, K = 0, rp = 0;     // rp: padded rank
  const int64_t* row_ids = nullptr;  // optional: the rows to visit (a segment); every [N, .] operand is indexed by
                                    // these physical row numbers, so one call serves a segment of a larger batch
  Dropout drop;                     // the mask over [N, K], applied to X and to the expand
  const scalar_t* x = nullptr;   // X [N, K], row stride ldx, unit column stride
  int64_t ldx = 0;
  const acc_t* m = nullptr;  // M [K, rp]  -> rowout = mask o X M        [N, rp]
  acc_t* rowout = nullptr;
  const acc_t* v = nullptr;  // V [N, rp]  -> colacc = (mask o X)^T V    [K, rp]
  acc_t* colacc = nullptr;
  scalar_t* y = nullptr;     // Y [N, K], row stride ldy: Y += alpha * mask o (EV E)
  int64_t ldy = 0;
  const acc_t* ev = nullptr;  // [N, rp]
  const acc_t* e = nullptr;   // [rp, K]
  acc_t alpha = 1;

  void run() const {
    const int nthreads = at::get_num_threads();
    const int64_t width = colacc ? K * rp : 0;
    std::vector<acc_t> partials(static_cast<size_t>(nthreads) * width, acc_t(0));
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      acc_t* part = partials.data() + at::get_thread_num() * width;
      std::vector<acc_t> xt(x ? kTileRows * K : 0), keep(drop.active ? kTileRows * K : 0);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * kTileRows, rows = std::min(kTileRows, N - n0);
        for (int64_t i = 0; i < rows && drop.active; ++i) row_keep(drop, row(n0 + i), K, keep.data() + i * K);
        const acc_t* kp = drop.active ? keep.data() : nullptr;
        if (x) load_tile(n0, rows, kp, xt.data());
        if (rowout) tile_rowout(n0, rows, xt.data());
        if (colacc) tile_colacc(n0, rows, xt.data(), part);
        if (y) tile_expand(n0, rows, kp);
      }
    });
    // Reduce the per-thread partials (a few [K, rp] buffers) into the output.
    for (int64_t i = 0; i < width; ++i) {
      acc_t sum = 0;
      for (int t = 0; t < nthreads; ++t) sum += partials[t * width + i];
      colacc[i] = sum;
    }
  }

  int64_t row(int64_t n) const { return row_ids ? row_ids[n] : n; }

  // xt[i, :] = mask o X[n0 + i, :] in the accumulation type; rows past the end are zero.
  void load_tile(int64_t n0, int64_t rows, const acc_t* keep, acc_t* xt) const {
    std::fill(xt + rows * K, xt + kTileRows * K, acc_t(0));
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* dst = xt + i * K;
      at::vec::convert(x + row(n0 + i) * ldx, dst, K);
      if (keep) {
        for (int64_t k = 0; k < K; ++k) dst[k] *= keep[i * K + k];
      }
    }
  }

  void tile_rowout(int64_t n0, int64_t rows, const acc_t* xt) const {
    for (int64_t c = 0; c < rp; c += chunk<acc_t>()) {
      Vec acc[kTileRows][2];
      for (auto& row : acc) row[0] = row[1] = Vec(acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const Vec m0 = Vec::loadu(m + k * rp + c), m1 = Vec::loadu(m + k * rp + c + Vec::size());
        for (int64_t i = 0; i < kTileRows; ++i) {
          const Vec xb(xt[i * K + k]);
          acc[i][0] = at::vec::fmadd(xb, m0, acc[i][0]);
          acc[i][1] = at::vec::fmadd(xb, m1, acc[i][1]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        acc[i][0].store(rowout + row(n0 + i) * rp + c);
        acc[i][1].store(rowout + row(n0 + i) * rp + c + Vec::size());
      }
    }
  }

  void tile_colacc(int64_t n0, int64_t rows, const acc_t* xt, acc_t* part) const {
    for (int64_t c = 0; c < rp; c += chunk<acc_t>()) {
      Vec vr[kTileRows][2];
      for (int64_t i = 0; i < kTileRows; ++i) {
        const int64_t n = row(n0 + std::min(i, rows - 1));  // rows past the end have xt = 0
        vr[i][0] = Vec::loadu(v + n * rp + c);
        vr[i][1] = Vec::loadu(v + n * rp + c + Vec::size());
      }
      for (int64_t k = 0; k < K; ++k) {
        acc_t* a = part + k * rp + c;
        Vec a0 = Vec::loadu(a), a1 = Vec::loadu(a + Vec::size());
        for (int64_t i = 0; i < kTileRows; ++i) {
          const Vec xb(xt[i * K + k]);
          a0 = at::vec::fmadd(xb, vr[i][0], a0);
          a1 = at::vec::fmadd(xb, vr[i][1], a1);
        }
        a0.store(a);
        a1.store(a + Vec::size());
      }
    }
  }

  void tile_expand(int64_t n0, int64_t rows, const acc_t* keep) const {
    constexpr int64_t W = chunk<acc_t>();
    for (int64_t c = 0; c < K; c += W) {
      const int64_t width = std::min(W, K - c), lo = std::min<int64_t>(width, Vec::size()), hi = width - lo;
      Vec acc[kTileRows][2];
      for (auto& row : acc) row[0] = row[1] = Vec(acc_t(0));
      for (int64_t j = 0; j < rp; ++j) {
        const acc_t* ej = e + j * K + c;
        const Vec e0 = Vec::loadu(ej, lo), e1 = hi > 0 ? Vec::loadu(ej + Vec::size(), hi) : Vec(acc_t(0));
        for (int64_t i = 0; i < kTileRows; ++i) {
          const Vec vb(ev[row(n0 + std::min(i, rows - 1)) * rp + j]);
          acc[i][0] = at::vec::fmadd(vb, e0, acc[i][0]);
          acc[i][1] = at::vec::fmadd(vb, e1, acc[i][1]);
        }
      }
      const Vec va(alpha);
      for (int64_t i = 0; i < rows; ++i) {
        Vec a0 = acc[i][0] * va, a1 = acc[i][1] * va;
        if (keep) {
          a0 = a0 * Vec::loadu(keep + i * K + c, lo);
          if (hi > 0) a1 = a1 * Vec::loadu(keep + i * K + c + Vec::size(), hi);
        }
        acc_t add[W];
        a0.store(add, lo);
        if (hi > 0) a1.store(add + Vec::size(), hi);
        add_into(y + row(n0 + i) * ldy + c, add, width);
      }
    }
  }
};

// Runs row(n, partial) for every row n of an [N, K] problem in parallel; each thread adds into its own zeroed
// `width` accumulators, which are summed into sums[0:width] at the end (column reductions in one pass).
template <typename acc_t, typename RowFn>
void rows_reducing(int64_t N, int64_t K, int64_t width, acc_t* sums, const RowFn& row) {
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> partials(static_cast<size_t>(nthreads) * width, acc_t(0));
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K)), [&](int64_t begin, int64_t end) {
    acc_t* part = partials.data() + at::get_thread_num() * width;
    for (int64_t n = begin; n < end; ++n) row(n, part);
  });
  for (int64_t i = 0; i < width; ++i) {
    acc_t sum = 0;
    for (int t = 0; t < nthreads; ++t) sum += partials[t * width + i];
    sums[i] = sum;
  }
}

// A float copy of a rank-r operand, zero-padded to rp along `rank_dim`.
inline at::Tensor padded(const at::Tensor& t, int64_t rank_dim, int64_t rp) {
  const auto acc = at::toOpMathType(t.scalar_type());
  auto sizes = t.sizes().vec();
  sizes[rank_dim] = rp;
  auto out = at::zeros(sizes, t.options().dtype(acc));
  out.narrow(rank_dim, 0, t.size(rank_dim)).copy_(t);
  return out;
}

// Rows of a 2-D matrix with unit column stride (a copy only when the view has none).
inline at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

}  // namespace peftops::cpu
