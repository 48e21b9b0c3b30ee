// LoRA on CUDA: cuBLAS (through ATen) for every product, with float32 accumulation; the hand-written part is
// the shared Philox dropout (common/cuda/dropout_kernels.cu), applied to a transient copy of x that is never
// kept for backward, and fused into the accumulation of the LoRA part of dx. Outputs are written in place.
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../common/cuda/dropout_kernels.h"
#include "../lora_linear.h"

namespace peftops::lora {
namespace {

// dropout(x) as a transient matrix (x itself when dropout is off).
at::Tensor dropped(const at::Tensor& x2, double dropout_p, const std::optional<at::Tensor>& seed) {
  if (dropout_p <= 0.0 || !seed.has_value() || !seed->defined()) return x2;
  const auto src = x2.stride(1) == 1 ? x2 : x2.contiguous();
  auto dst = at::empty_like(src, at::MemoryFormat::Contiguous);
  cuda::dropout_apply(src, dst, seed, dropout_p, /*accumulate=*/false);
  return dst;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                            double scale, double dropout_p,
                                                            const std::optional<at::Tensor>& seed) {
  check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  c10::cuda::CUDAGuard guard(x.device());
  const auto x2 = as_rows(x);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const auto t = at::mm(dropped(x2, dropout_p, seed), lora_a.t());
  y.addmm_(t, lora_b.t(), 1.0, scale);  // the up-projection added into the output in place
  return {y.view(out_shape), t.to(at::toOpMathType(x.scalar_type()))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& t, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 4> output_mask) {
  const auto [need_x, need_a, need_b, need_bias] = output_mask;
  c10::cuda::CUDAGuard guard(x.device());
  const auto x2 = as_rows(x);
  const auto dy = as_rows(grad_out);
  TORCH_CHECK_VALUE(dy.size(0) == x2.size(0) && dy.size(1) == weight.size(0), "lora_linear_backward: grad_out has shape ",
                    grad_out.sizes(), ", expected [..., ", weight.size(0), "] with ", x2.size(0), " rows");
  // Masked-off gradients come back as distinct empty tensors (outputs must not alias).
  const auto empty = [&] { return at::empty({0}, x.options()); };
  auto u = at::mm(dy, lora_b);  // [N, r]
  u.mul_(scale);
  at::Tensor dx = empty(), da = empty(), db = empty(), dbias = empty();
  if (need_b) db = at::mm(dy.t(), t.to(x.scalar_type())).mul_(scale);
  if (need_bias) dbias = dy.sum(0);
  if (need_a) da = at::mm(u.t(), dropped(x2, dropout_p, seed));  // the mask regenerated, never stored
  if (need_x) {
    dx = at::mm(dy, weight);
    if (dropout_p > 0.0 && seed.has_value() && seed->defined()) {
      cuda::dropout_apply(at::mm(u, lora_a), dx, seed, dropout_p, /*accumulate=*/true);
    } else {
      dx.addmm_(u, lora_a);
    }
    dx = dx.view(x.sizes());
  }
  return {dx, da, db, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace peftops::lora
