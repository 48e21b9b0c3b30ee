#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace peftops::bottleneck {

// base + scale [f(a) | 1] [Wu | bu]^T, one GEMM over rows: base [N, d_out], a [N, m] the pre-activation, bu optional.
// The forward adds the update to the residual; backward's save_output path takes it off the output again
// (scale negated), so the input it recovers is the forward's own arithmetic undone.
at::Tensor add_update(const at::Tensor& base, const at::Tensor& a, const at::Tensor& w_up,
                      const std::optional<at::Tensor>& b_up, int64_t activation, double scale);

}  // namespace peftops::bottleneck
