// Autograd of prefix_attention_forward: saves q, k, v and the prefix (no copies), the output, the merged LSE and the
// attention dropout's seed; never a probability matrix or a dropout mask. Gradients flow to q, k, v, prefix_k and
// prefix_v.
#include <torch/autograd.h>
#include <torch/library.h>

namespace peftops::prefix {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

class PrefixAttentionFunction : public torch::autograd::Function<PrefixAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& pk, const at::Tensor& pv, const OptTensor& attn_mask, bool is_causal,
                               std::optional<double> scale, double dropout_p, const OptTensor& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::prefix_attention_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const OptTensor&, bool,
                                                                   std::optional<double>, double, const OptTensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(q, k, v, pk, pv, attn_mask, is_causal, scale, dropout_p, seed);
    ctx->save_for_backward(
        {q, k, v, pk, pv, out, lse, attn_mask.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftops::prefix_attention_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const OptTensor&, bool, std::optional<double>, double, const OptTensor&)>();
    const auto s = ctx->get_saved_variables();
    const auto scale_iv = ctx->saved_data["scale"];
    const auto optional = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    auto [dq, dk, dv, dpk, dpv] =
        op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], optional(s[7]),
                ctx->saved_data["is_causal"].toBool(),
                scale_iv.isNone() ? std::nullopt : std::optional<double>(scale_iv.toDouble()),
                ctx->saved_data["dropout_p"].toDouble(), optional(s[8]));
    return {dq, dk, dv, dpk, dpv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward_autograd(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const at::Tensor& pk,
                                                                     const at::Tensor& pv, const OptTensor& attn_mask,
                                                                     bool is_causal, std::optional<double> scale,
                                                                     double dropout_p, const OptTensor& seed) {
  auto out = PrefixAttentionFunction::apply(q, k, v, pk, pv, attn_mask, is_causal, scale, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, Autograd, m) { m.impl("prefix_attention_forward", &prefix_attention_forward_autograd); }

}  // namespace peftops::prefix
