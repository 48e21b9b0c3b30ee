// IA3 on CUDA: cuBLAS for the product, ATen's fused elementwise and reduction kernels for the scaling and the
// vector gradients; the base output the output scaling's gradient needs is kept or recomputed (autograd's choice).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ia3_linear.h"

namespace peftops::ia3 {
namespace {

at::Tensor base_product(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

at::Tensor ia3_linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& scale, bool feedforward) {
  check_inputs(x, weight, bias, scale, feedforward);
  c10::cuda::CUDAGuard guard(x.device());
  const auto x2 = x.reshape({-1, x.size(-1)});
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  auto y = feedforward ? base_product(at::mul(x2, scale), weight, bias) : base_product(x2, weight, bias).mul_(scale);
  return y.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ia3_linear_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& base,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& scale, bool feedforward,
    std::array<bool, 3> output_mask) {
  const auto [need_x, need_bias, need_scale] = output_mask;
  c10::cuda::CUDAGuard guard(grad_out.device());
  const auto dy = grad_out.reshape({-1, grad_out.size(-1)});
  auto x_shape = grad_out.sizes().vec();
  x_shape.back() = weight.size(1);
  const auto x2 = [&] {
    TORCH_CHECK(x.has_value() && x->defined(), "ia3_linear_backward: x is needed");
    return x->reshape({-1, x->size(-1)});
  };
  const auto empty = [&] { return at::empty({0}, grad_out.options()); };
  // the column sums' products in float32 (a 16-bit product rounds, or overflows in float16, before the sum)
  const auto dt = grad_out.scalar_type(), acc = at::toOpMathType(dt);
  at::Tensor dx = empty(), db = empty(), dl = empty();
  if (feedforward) {
    if (need_x || need_scale) {
      const auto g = at::mm(dy, weight);
      if (need_x) dx = at::mul(g, scale).view(x_shape);
      if (need_scale) dl = at::mul(g.to(acc), x2()).sum(0).to(dt);
    }
    if (need_bias) db = dy.sum(0, false, acc).to(dt);
  } else {
    if (need_x) dx = at::mm(at::mul(dy, scale), weight).view(x_shape);
    if (need_scale) {
      const auto z = base.has_value() && base->defined() ? base->reshape({-1, base->size(-1)})
                                                         : base_product(x2(), weight, bias);
      dl = at::mul(dy.to(acc), z).sum(0).to(dt);
    }
    if (need_bias) db = dy.sum(0, false, acc).mul_(scale).to(dt);
  }
  return {dx, db, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("ia3_linear_forward", &ia3_linear_forward_cuda);
  m.impl("ia3_linear_backward", &ia3_linear_backward_cuda);
}

}  // namespace peftops::ia3
