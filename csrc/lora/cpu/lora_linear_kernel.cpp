// LoRA on the CPU. The two large products go to ATen's GEMM (MKL / oneDNN); everything LoRA adds runs in
// hand-written, vectorised passes over tiles of rows that regenerate the dropout mask on the fly
// (KERNELS.md, "LoRA"). One pass reads a [N, K] matrix X once and yields any of
//   X M  [N, r]  (rank-r shrink),   X^T V  [K, r]  (rank-r weight gradient),   X^T 1  [K]  (bias gradient),
// and adds  alpha * mask o (V E)  into a [N, K] matrix Y in place (rank-r expand), with one mask per tile.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../lora_linear.h"

namespace peftops::lora {
namespace {

// Register tiles: kTileRows rows at a time, the rank in chunks of two vectors (16 floats with AVX2); rank-r
// operands are zero-padded to whole chunks so no loop has a tail over r.
constexpr int64_t kTileRows = 4;

template <typename acc_t>
constexpr int64_t chunk() { return 2 * at::vec::Vectorized<acc_t>::size(); }

template <typename acc_t>
int64_t padded_rank(int64_t r) { return (r + chunk<acc_t>() - 1) / chunk<acc_t>() * chunk<acc_t>(); }

// keep[k] = dropout scale of element (row, k) of a [rows, cols] matrix: 0 or 1/(1-p). The Philox blocks of
// the row are made first in a branch-free loop the compiler vectorises, then spread over the elements.
template <typename acc_t>
void row_keep(const Dropout& d, int64_t row, int64_t cols, acc_t* keep) {
  const uint64_t first = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
  const uint64_t g0 = first >> 2, groups = ((first + cols + 3) >> 2) - g0;
  thread_local std::vector<uint32_t> words;
  words.resize(4 * groups);
  uint32_t* w = words.data();
  for (uint64_t g = 0; g < groups; ++g) {
    const Philox4 b = philox4x32_10(g0 + g, d.offset, d.seed);
    w[4 * g] = b.w0, w[4 * g + 1] = b.w1, w[4 * g + 2] = b.w2, w[4 * g + 3] = b.w3;
  }
  const auto scale = static_cast<acc_t>(d.keep_scale);
  const uint32_t* mine = w + (first & 3);
  for (int64_t k = 0; k < cols; ++k) keep[k] = mine[k] >= d.threshold ? scale : acc_t(0);
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
  int64_t N = 0, K = 0, rp = 0;  // rp: padded rank
  Dropout drop;                  // the mask over [N, K], applied to X and to the expand
  const scalar_t* x = nullptr;   // X [N, K], row stride ldx, unit column stride
  int64_t ldx = 0;
  const acc_t* m = nullptr;  // M [K, rp]  -> rowout = mask o X M        [N, rp]
  acc_t* rowout = nullptr;
  const acc_t* v = nullptr;  // V [N, rp]  -> colacc = (mask o X)^T V    [K, rp]
  acc_t* colacc = nullptr;
  acc_t* colsum = nullptr;   //               colsum = X^T 1              [K]
  scalar_t* y = nullptr;     // Y [N, K], row stride ldy: Y += alpha * mask o (EV E)
  int64_t ldy = 0;
  const acc_t* ev = nullptr;  // [N, rp]
  const acc_t* e = nullptr;   // [rp, K]
  acc_t alpha = 1;

  void run() const {
    const int nthreads = at::get_num_threads();
    const int64_t width = (colacc ? K * rp : 0) + (colsum ? K : 0);
    std::vector<acc_t> partials(static_cast<size_t>(nthreads) * width, acc_t(0));
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      acc_t* part = partials.data() + at::get_thread_num() * width;
      std::vector<acc_t> xt(x ? kTileRows * K : 0), keep(drop.active ? kTileRows * K : 0);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * kTileRows, rows = std::min(kTileRows, N - n0);
        for (int64_t i = 0; i < rows && drop.active; ++i) row_keep(drop, n0 + i, K, keep.data() + i * K);
        const acc_t* kp = drop.active ? keep.data() : nullptr;
        if (x) load_tile(n0, rows, kp, xt.data());
        if (rowout) tile_rowout(n0, rows, xt.data());
        if (colacc) tile_colacc(n0, rows, xt.data(), part);
        if (colsum) tile_colsum(rows, xt.data(), part + (colacc ? K * rp : 0));
        if (y) tile_expand(n0, rows, kp);
      }
    });
    // Reduce the per-thread partials (a few [K, rp] buffers) into the outputs.
    const int64_t cols = colacc ? K * rp : 0;
    for (int64_t i = 0; i < width; ++i) {
      acc_t sum = 0;
      for (int t = 0; t < nthreads; ++t) sum += partials[t * width + i];
      (i < cols ? colacc[i] : colsum[i - cols]) = sum;
    }
  }

  // xt[i, :] = mask o X[n0 + i, :] in the accumulation type; rows past the end are zero.
  void load_tile(int64_t n0, int64_t rows, const acc_t* keep, acc_t* xt) const {
    std::fill(xt + rows * K, xt + kTileRows * K, acc_t(0));
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* dst = xt + i * K;
      at::vec::convert(x + (n0 + i) * ldx, dst, K);
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
        acc[i][0].store(rowout + (n0 + i) * rp + c);
        acc[i][1].store(rowout + (n0 + i) * rp + c + Vec::size());
      }
    }
  }

  void tile_colacc(int64_t n0, int64_t rows, const acc_t* xt, acc_t* part) const {
    for (int64_t c = 0; c < rp; c += chunk<acc_t>()) {
      Vec vr[kTileRows][2];
      for (int64_t i = 0; i < kTileRows; ++i) {
        const int64_t n = n0 + std::min(i, rows - 1);  // rows past the end have xt = 0
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

  void tile_colsum(int64_t rows, const acc_t* xt, acc_t* sum) const {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t k = 0; k < K; ++k) sum[k] += xt[i * K + k];
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
          const Vec vb(ev[(n0 + std::min(i, rows - 1)) * rp + j]);
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
        add_into(y + (n0 + i) * ldy + c, add, width);
      }
    }
  }
};

// A float copy of a rank-r operand, zero-padded to rp along `rank_dim`.
at::Tensor padded(const at::Tensor& t, int64_t rank_dim, int64_t rp) {
  const auto acc = at::toOpMathType(t.scalar_type());
  auto sizes = t.sizes().vec();
  sizes[rank_dim] = rp;
  auto out = at::zeros(sizes, t.options().dtype(acc));
  out.narrow(rank_dim, 0, t.size(rank_dim)).copy_(t);
  return out;
}

// Rows of a 2-D matrix with unit column stride (a copy only when the view has none).
at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                           double scale, double dropout_p,
                                                           const std::optional<at::Tensor>& seed) {
  check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const auto x2 = unit_column_stride(as_rows(x));
  const int64_t N = x2.size(0), in = weight.size(1), out = weight.size(0), r = lora_a.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;
  // Base product by the vendor GEMM, bias fused in its epilogue.
  auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_linear_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rp = padded_rank<acc_t>(r);
    const auto a_t = padded(lora_a.t(), 1, rp);  // [in, rp]
    const auto b_t = padded(lora_b.t(), 0, rp);  // [rp, out]
    auto t_pad = at::empty({N, rp}, a_t.options());
    if (N > 0) {
      RowPass<scalar_t> down;  // t = dropout(x) A^T: one read of x, the mask made on the fly
      down.N = N, down.K = in, down.rp = rp, down.drop = make_dropout(dropout_p, seed);
      down.x = x2.const_data_ptr<scalar_t>(), down.ldx = x2.stride(0);
      down.m = a_t.const_data_ptr<acc_t>(), down.rowout = t_pad.data_ptr<acc_t>();
      down.run();
      RowPass<scalar_t> up;  // y += s t B^T, in place
      up.N = N, up.K = out, up.rp = rp;
      up.y = y.data_ptr<scalar_t>(), up.ldy = y.stride(0);
      up.ev = t_pad.const_data_ptr<acc_t>(), up.e = b_t.const_data_ptr<acc_t>(), up.alpha = static_cast<acc_t>(scale);
      up.run();
    }
    t = rp == r ? t_pad : t_pad.narrow(1, 0, r).contiguous();
  });
  return {y.view(out_shape), t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& t, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 4> output_mask) {
  const auto [need_x, need_a, need_b, need_bias] = output_mask;
  const auto x2 = unit_column_stride(as_rows(x));
  const auto dy = unit_column_stride(as_rows(grad_out));
  const int64_t N = x2.size(0), in = weight.size(1), out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK_VALUE(dy.size(0) == N && dy.size(1) == out, "lora_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected [..., ", out, "] with ", N, " rows");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == r, "lora_linear_backward: t must be [", N, ", ", r, "]");
  // Masked-off gradients come back as distinct empty tensors (outputs must not alias).
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = need_x ? at::mm(dy, weight) : empty();  // base part of dx: vendor GEMM; no weight gradient
  at::Tensor da = empty(), db = empty(), dbias = empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rp = padded_rank<acc_t>(r);
    const auto b_pad = padded(lora_b, 1, rp);  // [out, rp]
    const auto a_pad = padded(lora_a, 0, rp);  // [rp, in]
    const auto t_pad = padded(t, 1, rp);       // [N, rp]
    auto u = at::empty({N, rp}, b_pad.options());
    auto db_t = at::zeros({out, rp}, b_pad.options());
    auto da_t = at::zeros({in, rp}, b_pad.options());
    auto dbias_acc = at::zeros({out}, b_pad.options());
    if (N > 0) {
      // One pass over dy: u = dy B, dB = dy^T t and the bias gradient.
      RowPass<scalar_t> over_dy;
      over_dy.N = N, over_dy.K = out, over_dy.rp = rp;
      over_dy.x = dy.const_data_ptr<scalar_t>(), over_dy.ldx = dy.stride(0);
      over_dy.m = b_pad.const_data_ptr<acc_t>(), over_dy.rowout = u.data_ptr<acc_t>();
      over_dy.v = t_pad.const_data_ptr<acc_t>(), over_dy.colacc = need_b ? db_t.data_ptr<acc_t>() : nullptr;
      over_dy.colsum = need_bias ? dbias_acc.data_ptr<acc_t>() : nullptr;
      over_dy.run();
      u.mul_(scale);
      // One pass over the rows of x and dx, the mask regenerated once: dA^T = dropout(x)^T u and
      // dx += mask o (u A), in place on the GEMM's output.
      RowPass<scalar_t> over_x;
      over_x.N = N, over_x.K = in, over_x.rp = rp, over_x.drop = make_dropout(dropout_p, seed);
      if (need_a) {
        over_x.x = x2.const_data_ptr<scalar_t>(), over_x.ldx = x2.stride(0);
        over_x.v = u.const_data_ptr<acc_t>(), over_x.colacc = da_t.data_ptr<acc_t>();
      }
      if (need_x) {
        over_x.y = dx.data_ptr<scalar_t>(), over_x.ldy = dx.stride(0);
        over_x.ev = u.const_data_ptr<acc_t>(), over_x.e = a_pad.const_data_ptr<acc_t>();
      }
      if (need_a || need_x) over_x.run();
    }
    if (need_a) da = da_t.narrow(1, 0, r).t().contiguous().to(lora_a.scalar_type());
    if (need_b) db = db_t.narrow(1, 0, r).mul(scale).to(lora_b.scalar_type()).contiguous();
    if (need_bias) dbias = dbias_acc.to(x.scalar_type());
  });
  return {need_x ? dx.view(x.sizes()) : empty(), da, db, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace peftops::lora
