// LoRA forward and backward, one implementation for CPU and CUDA (KERNELS.md, "LoRA"). Every product goes to the
// vendor GEMM (MKL / oneDNN, cuBLAS) with float32 accumulation; the rank-r products are skinny GEMMs the vendor
// libraries already run at memory speed, and measured faster than hand-written passes (BENCHMARKS.md). What is
// fused around them:
//   - the up-projection is added into the base GEMM's output in place (one addmm_), the bias in its epilogue;
//   - dropout is the shared counter-based Philox (common/dropout.h), applied to x on its way into the rank-r
//     products (on the CPU a cache-sized block of rows at a time, so no dropped copy of x exists), regenerated
//     from the seed in backward, once for both dA and the LoRA part of dx;
//   - backward never forms the frozen weight's gradient; dx = dy W + (mask o) u A accumulates in place;
//   - saved for backward: x itself and the rank-r t = dropout(x) A^T, nothing else.
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../common/dropout.h"
#include "../common/products.h"
#include "lora_linear.h"

namespace peftops::lora {
namespace {

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

bool dropout_on(double dropout_p, const std::optional<at::Tensor>& seed) { return dropout_p > 0.0 && has(seed); }

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_kernel(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                              double scale, double dropout_p,
                                                              const std::optional<at::Tensor>& seed) {
  check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  c10::OptionalDeviceGuard guard(x.device());
  const auto x2 = as_rows(x);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  auto y = has(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const auto t = dropout_on(dropout_p, seed) ? dropout_shrink(x2, lora_a, seed, dropout_p)
                                             : at::mm(x2, lora_a.t());
  add_scaled_product(y, t, lora_b.t(), scale);  // the up-projection added into the output in place
  return {y.view(out_shape), t.to(at::toOpMathType(x.scalar_type()))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& t, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 4> output_mask) {
  const auto [need_x, need_a, need_b, need_bias] = output_mask;
  c10::OptionalDeviceGuard guard(x.device());
  const auto x2 = as_rows(x);
  const auto dy = as_rows(grad_out);
  TORCH_CHECK_VALUE(dy.size(0) == x2.size(0) && dy.size(1) == weight.size(0), "lora_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected [..., ", weight.size(0), "] with ", x2.size(0), " rows");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x2.size(0) && t.size(1) == lora_a.size(0),
                    "lora_linear_backward: t must be [", x2.size(0), ", ", lora_a.size(0), "]");
  // Masked-off gradients come back as distinct empty tensors (outputs must not alias).
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = empty(), da = empty(), db = empty(), dbias = empty();
  const auto u = scaled_product(dy, lora_b, scale);  // [N, r]
  // dB = s dy^T t, formed as (t^T dy)^T: MKL runs that orientation 1.5x faster in float32 (same in bf16)
  if (need_b) db = scaled_product(t.to(x.scalar_type()).t(), dy, scale).t().contiguous();
  if (need_bias) dbias = dy.sum(0);
  const bool dropout = dropout_on(dropout_p, seed);
  if (need_x) {
    dx = at::mm(dy, weight);  // the frozen weight's gradient is never formed
    if (!dropout) dx.addmm_(u, lora_a);
  }
  if (dropout && (need_x || need_a)) {  // the mask regenerated once for dx += mask o (u A) and dA, never stored
    auto d = dropout_lowrank_backward(x2, need_x ? dx : at::Tensor(), u, lora_a, seed,
                                      dropout_p, need_a);
    if (need_a) da = d;
  } else if (need_a) {
    da = at::mm(u.t(), x2);
  }
  if (need_x) dx = dx.view(x.sizes());
  return {dx, da, db, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_kernel);
  m.impl("lora_linear_backward", &lora_linear_backward_kernel);
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_kernel);
  m.impl("lora_linear_backward", &lora_linear_backward_kernel);
}

}  // namespace peftops::lora
