// Autograd of ia3_linear_forward: saves x, or for an output scaling that does not widen (out <= in) the base output
// x W^T + b instead (no bigger, and no GEMM to recompute it); no gradient for the frozen weight.
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../../common/saved_weight.h"

namespace peftops::ia3 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

class Ia3LinearFunction : public torch::autograd::Function<Ia3LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& scale, bool feedforward) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::ia3_linear_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const at::Tensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out, base;
    if (!feedforward && weight.size(0) <= weight.size(1)) {
      // Output scaling that does not widen: keep the base output (no bigger than x) rather than recompute it.
      base = at::linear(x, weight, bias);
      out = at::mul(base, scale);
    } else {
      out = op.call(x, weight, bias, scale, feedforward);
    }
    // the scale's gradient reads the weight unless it has the base output (output scaling)
    const bool scale_reads_weight = scale.requires_grad() && (feedforward || !base.defined());
    ctx->save_for_backward({base.defined() ? at::Tensor() : x, base,
                            scale_reads_weight ? weight : weight_for_dx(weight, x), bias.value_or(at::Tensor()),
                            scale});
    ctx->saved_data["feedforward"] = feedforward;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::ia3_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                             const OptTensor&, const at::Tensor&, bool, std::array<bool, 3>)>();
    const auto s = ctx->get_saved_variables();
    const auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Gradient edges are numbered over the tensors given: x, weight, [bias,] ia3_scale.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), has_bias && ctx->needs_input_grad(2),
                                      ctx->needs_input_grad(has_bias ? 3 : 2)};
    auto [dx, db, dl] = op.call(grads[0].contiguous(), opt(s[0]), opt(s[1]), s[2], opt(s[3]), s[4],
                                ctx->saved_data["feedforward"].toBool(), mask);
    return {mask[0] ? dx : at::Tensor(), at::Tensor(), mask[1] ? db : at::Tensor(), mask[2] ? dl : at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor ia3_linear_forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                       bool feedforward) {
  return Ia3LinearFunction::apply(x, weight, bias, scale, feedforward);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) { m.impl("ia3_linear_forward", &ia3_linear_forward_autograd); }

}  // namespace peftops::ia3
