#pragma once
#include <ATen/core/Tensor.h>

namespace peftops::ia3 {

// ia3_scale is [out] (output scaling) or [in] (feedforward=True: input scaling), as a 1-D view. `op` and `x_name`
// name the caller and its input in the messages.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& scale, bool feedforward, const char* op = "ia3_linear", const char* x_name = "x");

// peft's IA3 vector ([out, 1] for output scaling, [1, in] for input scaling) or a 1-D one, as 1-D; any other shape
// is an error (not silently reinterpreted).
at::Tensor scale_vector(const at::Tensor& ia3_scale, bool feedforward, const char* op);

}  // namespace peftops::ia3
