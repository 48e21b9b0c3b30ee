// Schemas of the BitFit ops (bias-only training) and the public, composite bias_dropout_add.
#include "bitfit.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/randint.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"

namespace peftops::bitfit {

void check_bias_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_linear: x must have shape [..., in_features], got a 0-d tensor");
  check_weight(weight, "bias_linear");
  TORCH_CHECK_VALUE(x.sym_size(-1) == weight.size(1), "bias_linear: x has ", x.sym_size(-1),
                    " input features but weight expects ", weight.size(1));
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == weight.size(0), "bias_linear: bias must be [", weight.size(0),
                    "], got shape ", bias.sizes());
  check_float(x, "bias_linear", "x");
  check_like(weight, x, "bias_linear", "weight", "x");
  check_like(bias, x, "bias_linear", "bias", "x");
}

void check_bias_dropout_add(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual, double p,
                            bool training) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_dropout_add: x must have shape [..., features], got a 0-d tensor");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.sym_size(-1), "bias_dropout_add: bias must be [",
                    x.sym_size(-1),
                    "], got shape ", bias.sizes());
  TORCH_CHECK_VALUE(residual.sym_sizes() == x.sym_sizes(), "bias_dropout_add: residual must have x's shape ",
                    x.sym_sizes(), ", got ", residual.sym_sizes());
  check_float(x, "bias_dropout_add", "x");
  check_like(bias, x, "bias_dropout_add", "bias", "x");
  check_like(residual, x, "bias_dropout_add", "residual", "x");
  check_dropout_p(p, training, "bias_dropout_add", "p");
}

// The forward of bias_linear is one GEMM with the bias in its epilogue on every device.
static at::Tensor bias_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_bias_linear(x, weight, bias);
  auto out_shape = x.sym_sizes().vec();  // sym_: traced shapes stay symbolic
  out_shape.back() = weight.sym_size(0);
  return at::addmm(bias, x.reshape_symint({-1, x.sym_size(-1)}), weight.t()).view_symint(out_shape);
}

static at::Tensor bias_dropout_add(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual, double p,
                                   bool training) {
  check_bias_dropout_add(x, bias, residual, p, training);
  std::optional<at::Tensor> seed;
  if (training && p > 0.0) seed = at::randint(std::numeric_limits<int64_t>::max(), {}, x.options().dtype(at::kLong));
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::bias_dropout_add_forward", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                              const std::optional<at::Tensor>&)>();
  return forward.call(x, bias, residual, seed.has_value() ? p : 0.0, seed);
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  // x W^T + b with a frozen W: gradients to x and b only, no activation saved.
  m.def("bias_linear(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("bias_linear_backward(Tensor grad_out, Tensor weight, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_bias)");
  // residual + dropout(x + bias), the mask regenerated in backward from the seed.
  m.def("bias_dropout_add(Tensor x, Tensor bias, Tensor residual, float p=0.0, *, bool training=True) -> Tensor");
  m.def("bias_dropout_add_forward(Tensor x, Tensor bias, Tensor residual, float p, Tensor? seed) -> Tensor");
  m.def("bias_dropout_add_backward(Tensor grad_out, float p, Tensor? seed, bool[2] output_mask) -> "
        "(Tensor grad_x, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeExplicitAutograd, m) { m.impl("bias_linear", &bias_linear_forward); }
TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("bias_dropout_add", &bias_dropout_add); }

}  // namespace peftops::bitfit
