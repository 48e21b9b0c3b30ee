#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace peftops::bottleneck {

// base + scale [f(a) | 1] [Wu | bu]^T, one GEMM over rows: base [N, d_out], a [N, m] the pre-activation, bu optional.
// The forward adds the update to the residual; backward's save_output path takes it off the output again
// (scale negated), so the input it recovers is the forward's own arithmetic undone.
at::Tensor add_update(const at::Tensor& base, const at::Tensor& a, const at::Tensor& w_up,
                      const std::optional<at::Tensor>& b_up, int64_t activation, double scale);

// The activation ops' own checks (internal, but reachable as torch.ops.peftops.*): a 2-D pre-activation a, a known
// activation code, and a gradient of a's shape, dtype and device.
inline void check_activation_args(const at::Tensor& a, int64_t activation, const at::Tensor* grad = nullptr) {
  TORCH_CHECK_VALUE(a.dim() == 2, "bottleneck_activation: a must be 2-D [tokens, m], got shape ", a.sizes());
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 3, "bottleneck_activation: activation code must be 0-3, got ",
                    activation);
  TORCH_CHECK_VALUE(grad == nullptr || (grad->sizes() == a.sizes() && grad->scalar_type() == a.scalar_type() &&
                                        grad->device() == a.device()),
                    "bottleneck_activation_backward: grad must have a's shape ", a.sizes(), ", dtype ",
                    a.scalar_type(), " and device ", a.device());
}

}  // namespace peftops::bottleneck
