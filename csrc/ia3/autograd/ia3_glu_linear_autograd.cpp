// Autograd of ia3_glu_linear_forward: saves gate and up (plus the parameters); no gradient for the frozen weight.
#include <torch/autograd.h>
#include <torch/library.h>

namespace peftops::ia3 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

class Ia3GluLinearFunction : public torch::autograd::Function<Ia3GluLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up,
                            const at::Tensor& weight, const OptTensor& bias, const at::Tensor& scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::ia3_glu_linear_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = op.call(gate, up, weight, bias, scale);
    ctx->save_for_backward({gate, up, weight, scale});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::ia3_glu_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, std::array<bool, 4>)>();
    const auto s = ctx->get_saved_variables();
    // Gradient edges are numbered over the tensors given: gate, up, weight, [bias,] ia3_scale.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(3), ctx->needs_input_grad(has_bias ? 4 : 3)};
    auto [da, db, dbias, dl] = op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], mask);
    const auto pick = [](bool need, const at::Tensor& g) { return need ? g : at::Tensor(); };
    return {pick(mask[0], da), pick(mask[1], db), at::Tensor(), pick(mask[2], dbias), pick(mask[3], dl)};
  }
};

at::Tensor ia3_glu_linear_forward_autograd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& weight,
                                           const OptTensor& bias, const at::Tensor& scale) {
  return Ia3GluLinearFunction::apply(gate, up, weight, bias, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) { m.impl("ia3_glu_linear_forward", &ia3_glu_linear_forward_autograd); }

}  // namespace peftops::ia3
