#pragma once
// Argument checks every op family shares: a clear Python exception (TypeError for a dtype, ValueError otherwise)
// naming the op and the argument, never a crash. The public ops' checks read an activation's sizes as sym_sizes: under
// torch.compile a concrete size() pins every dimension of the traced tensor (a graph per sequence length).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>

namespace peftops {

// `t` (argument `name`) must be a floating-point tensor the kernels take.
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", dt);
}

// `t` (argument `name`) must have the dtype and the device of `ref` (argument `ref_name`).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

// A frozen weight: 2-D [out, in] with at least one row and one column (an empty layer has nothing to adapt).
inline void check_weight(const at::Tensor& weight, const char* op, const char* name = "weight") {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1, op, ": ", name,
                    " must be 2-D [out, in] with out, in >= 1, got shape ", weight.sizes());
}

// An optional bias: [out] and like `ref`.
inline void check_bias(const std::optional<at::Tensor>& bias, int64_t out, const at::Tensor& ref, const char* op,
                       const char* ref_name) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be [", out, "], got shape ",
                    bias->sizes());
  check_like(*bias, ref, op, "bias", ref_name);
}

// A dropout probability in [0, 1); 1 too where dropout is off (eval), as nn.Dropout's eval takes it.
inline void check_dropout_p(double p, bool training, const char* op, const char* name) {
  TORCH_CHECK_VALUE(p >= 0.0 && (p < 1.0 || (!training && p == 1.0)), op, ": ", name, " must be in [0, 1)",
                    training ? "" : " (or 1 in eval)", ", got ", p);
}

// A scale the kernels apply in x's compute type (float32 for 16-bit and float32 inputs): finite there. 1e39 is a
// finite double but no float, and ATen would refuse it later with an error that names no argument.
inline void check_scale(double scale, const at::Tensor& x, const char* op) {
  const double limit = x.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                      : static_cast<double>(std::numeric_limits<float>::max());
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::abs(scale) <= limit, op, ": scale must be finite (in ",
                    x.scalar_type() == at::kDouble ? "float64" : "float32", "), got ", scale);
}

}  // namespace peftops
