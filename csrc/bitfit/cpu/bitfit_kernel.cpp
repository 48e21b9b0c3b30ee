// BitFit on the CPU: the bias gradient reduced in the same vectorised pass that produces dx (bias_dropout_add)
// or in one column-sum pass beside the vendor GEMM (bias_linear); dropout masks regenerated per row.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../../common/cpu/row_pass.h"
#include "../../common/dropout.h"
#include "../bitfit.h"

namespace peftops::bitfit {
namespace {

std::tuple<at::Tensor, at::Tensor> bias_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                            std::array<bool, 2> output_mask) {
  const auto dy = cpu::unit_column_stride(grad_out.reshape({-1, grad_out.size(-1)}));
  auto shape = grad_out.sizes().vec();
  shape.back() = weight.size(1);
  at::Tensor dx = output_mask[0] ? at::mm(dy, weight).view(shape) : at::empty({0}, grad_out.options());
  // the bias gradient: ATen's vectorised column reduction, accumulated in float
  at::Tensor db = output_mask[1] ? dy.sum(0, false, at::toOpMathType(dy.scalar_type())).to(dy.scalar_type())
                                 : at::empty({0}, grad_out.options());
  return {dx, db};
}

at::Tensor bias_dropout_add_forward_cpu(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual,
                                        double p, const std::optional<at::Tensor>& seed) {
  check_bias_dropout_add(x, bias, residual, p);
  const auto xc = x.contiguous(), rc = residual.contiguous();
  auto y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t H = x.size(-1), N = H ? x.numel() / H : 0;
  const Dropout drop = make_dropout(p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_dropout_add_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> b(H);
    at::vec::convert(bias.contiguous().const_data_ptr<scalar_t>(), b.data(), H);
    const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *rp = rc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xs(H), rs(H), keep(drop.active ? H : 0);
      for (int64_t n = begin; n < end; ++n) {
        at::vec::convert(xp + n * H, xs.data(), H);
        at::vec::convert(rp + n * H, rs.data(), H);
        if (drop.active) {
          cpu::row_keep(drop, n, H, keep.data());
          for (int64_t k = 0; k < H; ++k) xs[k] = rs[k] + keep[k] * (xs[k] + b[k]);
        } else {
          for (int64_t k = 0; k < H; ++k) xs[k] = rs[k] + (xs[k] + b[k]);
        }
        at::vec::convert(xs.data(), yp + n * H, H);
      }
    });
  });
  return y.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward_cpu(const at::Tensor& grad_out, double p,
                                                                 const std::optional<at::Tensor>& seed,
                                                                 std::array<bool, 2> output_mask) {
  const auto dy = grad_out.contiguous();
  const int64_t H = dy.size(-1), N = H ? dy.numel() / H : 0;
  at::Tensor dx = output_mask[0] ? at::empty_like(dy, at::MemoryFormat::Contiguous) : at::empty({0}, dy.options());
  at::Tensor db = at::empty({output_mask[1] ? H : 0}, dy.options());
  const Dropout drop = make_dropout(p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "bias_dropout_add_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto sum = at::empty({H}, dy.options().dtype(at::toOpMathType(dy.scalar_type())));
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = output_mask[0] ? dx.data_ptr<scalar_t>() : nullptr;
    // One pass: dx = mask o dy / (1 - p), and the bias gradient as its column sums.
    cpu::rows_reducing<acc_t>(N, H, output_mask[1] ? H : 0, sum.data_ptr<acc_t>(), [&](int64_t n, acc_t* part) {
      thread_local std::vector<acc_t> g, keep;
      g.resize(H);
      at::vec::convert(gp + n * H, g.data(), H);
      if (drop.active) {
        keep.resize(H);
        cpu::row_keep(drop, n, H, keep.data());
        for (int64_t k = 0; k < H; ++k) g[k] *= keep[k];
      }
      if (dxp) at::vec::convert(g.data(), dxp + n * H, H);
      if (output_mask[1]) {
        for (int64_t k = 0; k < H; ++k) part[k] += g[k];
      }
    });
    if (output_mask[1]) db.copy_(sum);
  });
  return {output_mask[0] ? dx.view(grad_out.sizes()) : dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("bias_linear_backward", &bias_linear_backward_cpu);
  m.impl("bias_dropout_add_forward", &bias_dropout_add_forward_cpu);
  m.impl("bias_dropout_add_backward", &bias_dropout_add_backward_cpu);
}

}  // namespace peftops::bitfit
