// Autograd of lora_linear_forward: saves x (no copy), the rank-r t and the seed; never a dropout mask, never
// a gradient for the frozen weight.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../../common/saved_weight.h"

namespace peftops::lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scale, double dropout_p,
                               const std::optional<at::Tensor>& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::lora_linear_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, double, double, const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, t] = op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
    ctx->save_for_backward({x, weight_for_dx(weight, x), lora_a, lora_b, t, seed.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({t});
    return {out, t};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::lora_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, double, const std::optional<at::Tensor>&,
                             std::array<bool, 4>)>();
    const auto saved = ctx->get_saved_variables();
    // Gradient edges are numbered over the tensors given: x, weight, [bias,] lora_a, lora_b.
    const size_t has_bias = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2 + has_bias),
                                      ctx->needs_input_grad(3 + has_bias), has_bias && ctx->needs_input_grad(2)};
    const auto seed = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    auto [dx, da, db, dbias] = op.call(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4],
                                       ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                                       seed, mask);
    const auto pick = [](bool need, const at::Tensor& g) { return need ? g : at::Tensor(); };
    return {pick(mask[0], dx), at::Tensor(), pick(mask[3], dbias), pick(mask[1], da), pick(mask[2], db),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                double scale, double dropout_p,
                                                                const std::optional<at::Tensor>& seed) {
  auto out = LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) { m.impl("lora_linear_forward", &lora_linear_forward_autograd); }

}  // namespace peftops::lora
