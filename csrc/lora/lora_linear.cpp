// Schema of the LoRA op family and its public, composite entry point (torchvision's csrc/ops/ layout).
#include "lora_linear.h"

#include <ATen/ops/randint.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"

namespace peftops::lora {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                  const char* op, bool training) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [..., in_features], got a 0-d tensor");
  check_weight(weight, op);
  TORCH_CHECK_VALUE(lora_a.dim() == 2, op, ": lora_a must be 2-D [r, in], got shape ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == 2, op, ": lora_b must be 2-D [out, r], got shape ", lora_b.sizes());
  const auto in = weight.size(1), out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK_VALUE(x.sym_size(-1) == in, op, ": x has ", x.sym_size(-1), " input features but weight expects ", in);
  TORCH_CHECK_VALUE(r >= 1, op, ": lora_a must have rank r >= 1, got shape ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_a.size(1) == in, op, ": lora_a must be [r, ", in, "], got shape ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.size(0) == out && lora_b.size(1) == r, op, ": lora_b must be [", out, ", ", r,
                    "] (out, r of lora_a), got shape ", lora_b.sizes());
  check_float(x, op, "x");
  check_like(weight, x, op, "weight", "x");
  check_like(lora_a, x, op, "lora_a", "x");
  check_like(lora_b, x, op, "lora_b", "x");
  check_bias(bias, out, x, op, "x");
  check_scale(scale, x, op);
  check_dropout_p(dropout_p, training, op, "dropout_p");
}

at::Tensor as_rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}); }

// Public op: validates, draws the dropout seed from torch's generator for x's device, calls the fused forward.
// CompositeImplicitAutograd, so autograd, torch.compile and activation checkpointing see the seed draw.
static at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                              bool training) {
  check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p, "lora_linear", training);
  std::optional<at::Tensor> seed;
  if (training && dropout_p > 0.0) {
    seed = at::randint(std::numeric_limits<int64_t>::max(), {}, x.options().dtype(at::kLong));
  }
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::lora_linear_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, double, double, const std::optional<at::Tensor>&)>();
  return std::get<0>(forward.call(x, weight, bias, lora_a, lora_b, scale, training ? dropout_p : 0.0, seed));
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
        "float dropout_p=0.0, *, bool training=True) -> Tensor");
  // out = x W^T + b + scale * dropout(x) A^T B^T; t = dropout(x) A^T (float32) is saved for backward.
  m.def("lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
        "float dropout_p, Tensor? seed) -> (Tensor out, Tensor t)");
  // output_mask picks (grad_x, grad_lora_a, grad_lora_b, grad_bias); masked-off gradients come back empty.
  m.def("lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor t, "
        "float scale, float dropout_p, Tensor? seed, bool[4] output_mask) -> "
        "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("lora_linear", &lora_linear); }

}  // namespace peftops::lora
