// Autograd of dora_linear_forward: saves x (no copy), z, t, the detached norms and the seed; no mask, no
// gradient for the frozen weight, none through the norms (as peft).
#include <torch/autograd.h>
#include <torch/library.h>

#include "../../common/saved_weight.h"

namespace peftops::dora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

class DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& magnitude, double scale, double dropout_p, const OptTensor& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::dora_linear_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, double, const OptTensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, z, t, norm] = op.call(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed);
    ctx->save_for_backward(
        {x, weight_for_dx(weight, x), lora_a, lora_b, magnitude, z, t, norm, seed.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({z, t, norm});
    return {out, z, t, norm};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::dora_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, double, const OptTensor&, std::array<bool, 5>)>();
    const auto s = ctx->get_saved_variables();
    // Gradient edges are numbered over the tensors given: x, weight, [bias,] lora_a, lora_b, magnitude, [seed].
    const size_t b = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2 + b),
                                      ctx->needs_input_grad(3 + b), ctx->needs_input_grad(4 + b),
                                      b && ctx->needs_input_grad(2)};
    auto [dx, da, db, dm, dbias] =
        op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                s[8].defined() ? OptTensor(s[8]) : std::nullopt, mask);
    const auto pick = [](bool need, const at::Tensor& g) { return need ? g : at::Tensor(); };
    return {pick(mask[0], dx), at::Tensor(), pick(mask[4], dbias), pick(mask[1], da), pick(mask[2], db),
            pick(mask[3], dm), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, const OptTensor& seed) {
  auto out = DoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) { m.impl("dora_linear_forward", &dora_linear_forward_autograd); }

}  // namespace peftops::dora
