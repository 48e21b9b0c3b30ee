// Autograd of multi_lora_linear_forward: saves x (no copy), the per-token rank-r t and the index; gradients
// to x, every adapter's lora_a / lora_b, the bias and (when they train) the scales, never to the frozen weight.
#include <ATen/ops/ones_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../../common/saved_weight.h"

namespace peftops::multi_lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MultiLoraLinearFunction : public torch::autograd::Function<MultiLoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, const at::Tensor& scales, const at::Tensor& adapter_index) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::multi_lora_linear_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, t] = op.call(x, weight, bias, lora_a, lora_b, scales, adapter_index);
    ctx->save_for_backward({x, weight_for_dx(weight, x), lora_a, lora_b, scales, adapter_index, t});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({t});
    return {out, t};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::multi_lora_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             std::array<bool, 4>)>();
    const auto s = ctx->get_saved_variables();
    // Gradient edges are numbered over the tensors given: x, weight, [bias,] lora_a, lora_b, scales, index.
    const size_t has_bias = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2 + has_bias),
                                      ctx->needs_input_grad(3 + has_bias), has_bias && ctx->needs_input_grad(2)};
    const auto dy = grads[0].contiguous();
    auto [dx, da, db, dbias] = op.call(dy, s[0], s[1], s[2], s[3], s[4], s[5], s[6], mask);
    at::Tensor dscales;
    if (ctx->needs_input_grad(4 + has_bias)) {
      // d scale_a = <dy_a^T t_a, B_a>: lora_b's gradient at unit scales contracted with lora_b (one more pass over dy,
      // only when the scales train)
      const auto db_unit = std::get<2>(op.call(dy, s[0], s[1], s[2], s[3], at::ones_like(s[4]), s[5], s[6],
                                               {false, false, true, false}));
      dscales = db_unit.mul(s[3]).sum({1, 2}, false, at::kDouble).to(s[4].device(), s[4].scalar_type());  // may be CPU
    }
    const auto pick = [](bool need, const at::Tensor& g) { return need ? g : at::Tensor(); };
    return {pick(mask[0], dx), at::Tensor(), pick(mask[3], dbias), pick(mask[1], da), pick(mask[2], db), dscales,
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_forward_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scales, const at::Tensor& adapter_index) {
  auto out = MultiLoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scales, adapter_index);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) {
  m.impl("multi_lora_linear_forward", &multi_lora_linear_forward_autograd);
}

}  // namespace peftops::multi_lora
