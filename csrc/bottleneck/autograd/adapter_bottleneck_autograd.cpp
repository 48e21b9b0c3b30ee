// Autograd of adapter_bottleneck_forward: saves h (no copy) and the [N, m] pre-activation a, nothing else; the
// residual's gradient is grad_out itself. With save_output (the residual being h) it saves the output y in place of
// h: where the model's next layer keeps y for its own backward (a pre-LN layer's output, read by the next norm), h
// then costs nothing, and backward recovers it as y - s [f(a) | 1] [Wu | bu]^T, exact to y's rounding.
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../adapter_bottleneck.h"

namespace peftops::bottleneck {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

class AdapterBottleneckFunction : public torch::autograd::Function<AdapterBottleneckFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w_down,
                               const OptTensor& b_down, const at::Tensor& w_up, const OptTensor& b_up,
                               int64_t activation, double scale, const OptTensor& residual, bool save_output) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::adapter_bottleneck_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const OptTensor&, const at::Tensor&,
                                                                   const OptTensor&, int64_t, double,
                                                                   const OptTensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, a] = op.call(h, w_down, b_down, w_up, b_up, activation, scale, residual, save_output);
    const bool recover = save_output && !(residual.has_value() && residual->defined());
    ctx->save_for_backward({recover ? out : h, a, w_down, w_up, b_up.value_or(at::Tensor())});
    ctx->saved_data["recover_h"] = recover;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_b_down"] = b_down.has_value() && b_down->defined();
    ctx->saved_data["has_b_up"] = b_up.has_value() && b_up->defined();
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    ctx->mark_non_differentiable({a});
    return {out, a};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::adapter_bottleneck_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, double, bool, bool, std::array<bool, 5>)>();
    const auto s = ctx->get_saved_variables();
    const bool has_bd = ctx->saved_data["has_b_down"].toBool(), has_bu = ctx->saved_data["has_b_up"].toBool();
    const bool has_res = ctx->saved_data["has_residual"].toBool();
    // Gradient edges are numbered over the tensors given: h, w_down, [b_down,] w_up, [b_up,] [residual].
    size_t e = 0;
    const size_t e_h = e++, e_wd = e++, e_bd = has_bd ? e++ : 0, e_wu = e++, e_bu = has_bu ? e++ : 0;
    const size_t e_res = has_res ? e++ : 0;
    const std::array<bool, 5> mask = {ctx->needs_input_grad(e_h), ctx->needs_input_grad(e_wd),
                                      has_bd && ctx->needs_input_grad(e_bd), ctx->needs_input_grad(e_wu),
                                      has_bu && ctx->needs_input_grad(e_bu)};
    at::Tensor h = s[0];
    if (ctx->saved_data["recover_h"].toBool()) {  // h = y - s [f(a) | 1] [Wu | bu]^T, in y's dtype, never autocast
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      // (sym_: traced by AOT autograd, where a concrete size would pin the shape)
      h = add_update(s[0].reshape_symint({-1, s[0].sym_size(-1)}), s[1], s[3], s[4],
                     ctx->saved_data["activation"].toInt(), -ctx->saved_data["scale"].toDouble())
              .view_symint(s[0].sym_sizes());
    }
    auto [dh, dwd, dbd, dwu, dbu] = op.call(grads[0].contiguous(), h, s[1], s[2], s[3],
                                            ctx->saved_data["activation"].toInt(), ctx->saved_data["scale"].toDouble(),
                                            !has_res, has_bu, mask);
    const auto pick = [](bool need, const at::Tensor& g) { return need ? g : at::Tensor(); };
    return {pick(mask[0], dh), pick(mask[1], dwd), pick(mask[2], dbd), pick(mask[3], dwu), pick(mask[4], dbu),
            at::Tensor(), at::Tensor(), has_res && ctx->needs_input_grad(e_res) ? grads[0] : at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> adapter_bottleneck_forward_autograd(const at::Tensor& h, const at::Tensor& w_down,
                                                                       const OptTensor& b_down, const at::Tensor& w_up,
                                                                       const OptTensor& b_up, int64_t activation,
                                                                       double scale, const OptTensor& residual,
                                                                       bool save_output) {
  auto out = AdapterBottleneckFunction::apply(h, w_down, b_down, w_up, b_up, activation, scale, residual,
                                              save_output);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) {
  m.impl("adapter_bottleneck_forward", &adapter_bottleneck_forward_autograd);
}

}  // namespace peftops::bottleneck
