// LoRA on the CPU. The two large products go to ATen's GEMM (MKL / oneDNN); everything LoRA adds runs in the
// vectorised row passes of common/cpu/row_pass.h, which regenerate the dropout mask on the fly (KERNELS.md):
//   forward:  t = dropout(x) A^T (one pass over x), then y += s t B^T in place;
//   backward: u = s dy B, dB = s dy^T t, db = dy^T 1 (one pass over dy), then dA = u^T dropout(x) and
//             dx += mask o (u A) in place on dx = dy W (one pass over x and dx, one mask).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../../common/cpu/row_pass.h"
#include "../lora_linear.h"

namespace peftops::lora {
namespace {

using cpu::padded;
using cpu::padded_rank;
using cpu::RowPass;
using cpu::unit_column_stride;

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
