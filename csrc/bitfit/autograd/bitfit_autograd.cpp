// Autograd of the BitFit ops: bias_linear saves only the frozen weight, when x needs a gradient (no activation);
// bias_dropout_add saves only its seed. The residual's gradient is grad_out itself.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../../common/saved_weight.h"

namespace peftops::bitfit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class BiasLinearFunction : public torch::autograd::Function<BiasLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::bias_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, weight, bias);
    ctx->save_for_backward({weight_for_dx(weight, x)});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::bias_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   std::array<bool, 2>)>();
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2)};
    auto [dx, db] = op.call(grads[0].contiguous(), ctx->get_saved_variables()[0], mask);
    return {mask[0] ? dx : at::Tensor(), at::Tensor(), mask[1] ? db : at::Tensor()};
  }
};

class BiasDropoutAddFunction : public torch::autograd::Function<BiasDropoutAddFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias,
                            const at::Tensor& residual, double p, const std::optional<at::Tensor>& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::bias_dropout_add_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                           const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(x, bias, residual, p, seed);
    ctx->save_for_backward({seed.value_or(at::Tensor())});
    ctx->saved_data["p"] = p;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::bias_dropout_add_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double,
                                                                   const std::optional<at::Tensor>&,
                                                                   std::array<bool, 2>)>();
    const auto seed = ctx->get_saved_variables()[0];
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    auto [dx, db] = op.call(grads[0].contiguous(), ctx->saved_data["p"].toDouble(),
                            seed.defined() ? std::optional<at::Tensor>(seed) : std::nullopt, mask);
    return {mask[0] ? dx : at::Tensor(), mask[1] ? db : at::Tensor(),
            ctx->needs_input_grad(2) ? grads[0] : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bias_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return BiasLinearFunction::apply(x, weight, bias);
}

at::Tensor bias_dropout_add_forward_autograd(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual,
                                             double p, const std::optional<at::Tensor>& seed) {
  return BiasDropoutAddFunction::apply(x, bias, residual, p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) {
  m.impl("bias_linear", &bias_linear_autograd);
  m.impl("bias_dropout_add_forward", &bias_dropout_add_forward_autograd);
}

}  // namespace peftops::bitfit
