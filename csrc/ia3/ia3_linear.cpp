// Schema of IA3 (learned scaling vectors, peft's semantics) and its public, composite entry point.
#include "ia3_linear.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace peftops::ia3 {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& scale, bool feedforward, const char* op, const char* x_name) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", x_name, " must have shape [..., in_features], got a 0-d tensor");
  check_weight(weight, op);
  const auto in = weight.size(1), out = weight.size(0);
  TORCH_CHECK_VALUE(x.sym_size(-1) == in, op, ": ", x_name, " has ", x.sym_size(-1),
                    " input features but weight expects ",
                    in);
  const auto want = feedforward ? in : out;
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == want, op, ": ia3_scale must have ", want, " elements (",
                    feedforward ? "in_features, feedforward=True" : "out_features", "), got shape ", scale.sizes());
  check_float(x, op, x_name);
  check_like(weight, x, op, "weight", x_name);
  check_like(scale, x, op, "ia3_scale", x_name);
  check_bias(bias, out, x, op, x_name);
}

at::Tensor scale_vector(const at::Tensor& ia3_scale, bool feedforward, const char* op) {
  const bool ok = ia3_scale.dim() == 1 ||
                  (ia3_scale.dim() == 2 && (feedforward ? ia3_scale.size(0) == 1 : ia3_scale.size(1) == 1));
  TORCH_CHECK_VALUE(ok, op, ": ia3_scale must be 1-D or peft's ",
                    feedforward ? "[1, in_features]" : "[out_features, 1]", ", got shape ", ia3_scale.sizes());
  return ia3_scale.reshape({-1});
}

static at::Tensor ia3_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& ia3_scale, bool feedforward) {
  const auto scale = scale_vector(ia3_scale, feedforward, "ia3_linear");
  check_inputs(x, weight, bias, scale, feedforward);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::ia3_linear_forward", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                              const at::Tensor&, bool)>();
  return forward.call(x, weight, bias, scale, feedforward);
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  // feedforward=False: (x W^T + b) o l, l [out];  feedforward=True: (x o l) W^T + b, l [in]. W frozen.
  m.def("ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_scale, *, bool feedforward=False) -> Tensor");
  m.def("ia3_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_scale, bool feedforward) -> Tensor");
  // x: the input (the feed-forward scale's gradient needs it); base: x W^T + b where the output scaling's gradient
  // needs it and it was kept (recomputed from x when not given).
  m.def("ia3_linear_backward(Tensor grad_out, Tensor? x, Tensor? base, Tensor weight, Tensor? bias, "
        "Tensor ia3_scale, bool feedforward, bool[3] output_mask) -> (Tensor grad_x, Tensor grad_bias, "
        "Tensor grad_scale)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("ia3_linear", &ia3_linear); }

}  // namespace peftops::ia3
