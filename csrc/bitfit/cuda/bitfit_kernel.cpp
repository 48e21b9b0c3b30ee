// BitFit on CUDA: cuBLAS for the GEMM, ATen's reduction for the bias gradient, and the shared Philox kernel
// (common/cuda/dropout_kernels.cu) for residual + dropout(x + bias) in one pass, forward and backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../common/cuda/dropout_kernels.h"
#include "../bitfit.h"

namespace peftops::bitfit {
namespace {

std::tuple<at::Tensor, at::Tensor> bias_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                                             std::array<bool, 2> output_mask) {
  TORCH_CHECK_VALUE(grad_out.device() == weight.device(), "bias_linear_backward: grad_out is on ", grad_out.device(),
                    " but weight is on ", weight.device());
  c10::cuda::CUDAGuard guard(grad_out.device());
  const auto dy = grad_out.reshape({-1, grad_out.size(-1)});
  auto shape = grad_out.sizes().vec();
  shape.back() = weight.size(1);
  return {output_mask[0] ? at::mm(dy, weight).view(shape) : at::empty({0}, grad_out.options()),
          output_mask[1] ? dy.sum(0) : at::empty({0}, grad_out.options())};
}

// [rows, H] (explicit row count: a view cannot infer -1 when H is 0)
at::Tensor rows(const at::Tensor& t) {
  const auto H = t.size(-1);
  return t.contiguous().view({H ? t.numel() / H : 0, H});
}

at::Tensor bias_dropout_add_forward_cuda(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual,
                                         double p, const std::optional<at::Tensor>& seed) {
  check_bias_dropout_add(x, bias, residual, p);  // dropout_apply guards the device and checks the seed
  const auto x2 = rows(x);
  auto y = at::empty_like(x2, at::MemoryFormat::Contiguous);
  cuda::dropout_apply(x2, y, seed, p, /*accumulate=*/false, bias.contiguous(), rows(residual));
  return y.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward_cuda(const at::Tensor& grad_out, double p,
                                                                  const std::optional<at::Tensor>& seed,
                                                                  std::array<bool, 2> output_mask) {
  const auto dy = rows(grad_out);
  auto dx = at::empty_like(dy, at::MemoryFormat::Contiguous);
  cuda::dropout_apply(dy, dx, seed, p, /*accumulate=*/false);
  return {output_mask[0] ? dx.view(grad_out.sizes()) : at::empty({0}, grad_out.options()),
          output_mask[1] ? dx.sum(0) : at::empty({0}, grad_out.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("bias_linear_backward", &bias_linear_backward_cuda);
  m.impl("bias_dropout_add_forward", &bias_dropout_add_forward_cuda);
  m.impl("bias_dropout_add_backward", &bias_dropout_add_backward_cuda);
}

}  // namespace peftops::bitfit
