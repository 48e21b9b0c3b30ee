#pragma once
#include <ATen/core/Tensor.h>

namespace peftops::ia3 {

// ia3_scale is [out] (output scaling) or [in] (feedforward=True: input scaling), as a 1-D view. `op` and `x_name`
// name the caller and its input in the messages.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& scale, bool feedforward, const char* op = "ia3_linear", const char* x_name = "x");

}  // namespace peftops::ia3
