// Rank-r products with dropout on their input (common/dropout.h). On the CPU the rows go in blocks small enough to
// stay in cache: the mask is drawn into a block, the vendor GEMM reads the block, and nothing [N, K] is allocated
// beyond the outputs; threads take whole blocks and call the GEMM single-threaded on them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "cpu/row_pass.h"
#include "dropout.h"

namespace peftops {
namespace {

// About 256 KiB of x's rows per block, so the block, its mask and the GEMM's result rows share a core's L2.
int64_t rows_per_block(const at::Tensor& x) {
  return std::clamp<int64_t>((int64_t{256} << 10) / std::max<int64_t>(1, x.size(1) * x.element_size()), 4, 1024);
}

// x [N, K] with unit column stride (a copy only for a view that has none), checked against a [r, K].
at::Tensor rows_of(const at::Tensor& x, const at::Tensor& a, const char* op) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && a.size(1) == x.size(1), op, ": expects x [N, K] and a [r, K]");
  return cpu::unit_column_stride(x);
}

// The blocks [n0, n0 + rows) of an [N, K] matrix, in parallel. Worker threads do not inherit the caller's
// dispatch state, so each says again that it runs below autograd (these kernels are).
template <typename Fn>
void for_blocks(int64_t N, int64_t block, const Fn& fn) {
  at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b = begin; b < end; ++b) fn(b * block, std::min(block, N - b * block));
  });
}

// keep[i, :] = the mask's row n0 + i, and block[i, :] = keep[i, :] o x[n0 + i, :] in the accumulation type, for the
// block's rows.
template <typename scalar_t, typename acc_t>
void mask_block(const Dropout& d, const at::Tensor& x, int64_t n0, int64_t rows, acc_t* keep, acc_t* block,
                acc_t* scratch) {
  const int64_t K = x.size(1);
  for (int64_t i = 0; i < rows; ++i) {
    cpu::row_keep(d, n0 + i, K, keep + i * K);
    cpu::masked_row(keep + i * K, x.const_data_ptr<scalar_t>() + (n0 + i) * x.stride(0), block + i * K, K,
                    /*accumulate=*/false, scratch);
  }
}

}  // namespace

// The blocks and their rank-r products are in the accumulation type: 16-bit inputs are converted once on their way
// through the mask, and the small GEMMs run in float32 (faster here than 16-bit GEMMs on 64-row blocks).
at::Tensor dropout_shrink(const at::Tensor& x_in, const at::Tensor& a, const std::optional<at::Tensor>& seed,
                          double p) {
  const auto x = rows_of(x_in, a, "dropout_shrink");
  if (!x.is_cpu()) return at::mm(dropped(x, seed, p), a.t());
  const Dropout d = make_dropout(p, seed);
  const int64_t N = x.size(0), K = x.size(1), B = rows_per_block(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto a_acc = a.to(acc);
  auto t = at::empty({N, a.size(0)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_shrink_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_blocks(N, B, [&](int64_t n0, int64_t rows) {
      thread_local std::vector<acc_t> keep, scratch;
      keep.resize(rows * K), scratch.resize(2 * K);
      auto block = at::empty({rows, K}, t.options());
      mask_block<scalar_t>(d, x, n0, rows, keep.data(), block.data_ptr<acc_t>(), scratch.data());
      auto out = t.narrow(0, n0, rows);
      at::mm_out(out, block, a_acc.t());
    });
  });
  return t.to(x.scalar_type());
}

at::Tensor dropout_lowrank_backward(const at::Tensor& x_in, const at::Tensor& dx, const at::Tensor& u,
                                    const at::Tensor& a, const std::optional<at::Tensor>& seed, double p,
                                    bool want_da) {
  const auto x = rows_of(x_in, a, "dropout_lowrank_backward");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == x.size(0) && u.size(1) == a.size(0) &&
                  (!dx.defined() || (dx.sizes() == x.sizes() && unit_columns(dx))),
              "dropout_lowrank_backward: expects u [N, r] and dx like x");
  if (!x.is_cpu()) {
    if (dx.defined()) {
      auto grad = dx;
      dropout_apply(at::mm(u, a), grad, seed, p, /*accumulate=*/true);
    }
    return want_da ? at::mm(u.t(), dropped(x, seed, p)) : at::Tensor();
  }
  const Dropout d = make_dropout(p, seed);
  const int64_t N = x.size(0), K = x.size(1), r = a.size(0), B = rows_per_block(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto a_acc = a.to(acc), u_acc = u.to(acc);
  // dA partial sums, one per thread, in the accumulation type
  auto partials = want_da ? at::zeros({at::get_num_threads(), r, K}, x.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_lowrank_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_blocks(N, B, [&](int64_t n0, int64_t rows) {
      thread_local std::vector<acc_t> keep, scratch;
      keep.resize(rows * K), scratch.resize(2 * K);
      const auto ub = u_acc.narrow(0, n0, rows);
      if (want_da) {  // dA += u_b^T (mask o x_b); the mask drawn here serves dx too
        auto block = at::empty({rows, K}, partials.options());
        mask_block<scalar_t>(d, x, n0, rows, keep.data(), block.data_ptr<acc_t>(), scratch.data());
        partials[cpu::thread_slot(partials.size(0))].addmm_(ub.t(), block);
      }
      if (dx.defined()) {  // dx_b += mask o (u_b A)
        for (int64_t i = 0; i < rows && !want_da; ++i) cpu::row_keep(d, n0 + i, K, keep.data() + i * K);
        const auto ua = at::mm(ub, a_acc);
        for (int64_t i = 0; i < rows; ++i) {
          cpu::masked_row(keep.data() + i * K, ua.const_data_ptr<acc_t>() + i * K,
                          dx.data_ptr<scalar_t>() + (n0 + i) * dx.stride(0), K, /*accumulate=*/true, scratch.data());
        }
      }
    });
  });
  return want_da ? partials.sum(0).to(x.scalar_type()) : at::Tensor();
}

}  // namespace peftops
