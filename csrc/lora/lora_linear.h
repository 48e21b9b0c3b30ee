#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace peftops::lora {

// Validates the public arguments of lora_linear; every message names the argument at fault. (The fused ops get
// dropout_p = 0 in eval, so only the public ops pass `training`.)
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                  const char* op = "lora_linear", bool training = true);

// Flattens x [..., in] to 2-D rows without copying where the strides allow it.
at::Tensor as_rows(const at::Tensor& x);

}  // namespace peftops::lora
