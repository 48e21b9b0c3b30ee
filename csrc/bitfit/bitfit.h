#pragma once
#include <ATen/core/Tensor.h>

namespace peftops::bitfit {

void check_bias_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
void check_bias_dropout_add(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual, double p,
                            bool training = true);

}  // namespace peftops::bitfit
