// DoRA as peft defines it (peft/tuners/lora/dora.py and variants.py), composed from the fused LoRA ops:
//   no dropout:    y = g o (x W^T + s x A^T B^T) + b
//   with dropout:  y = x W^T + b + (g - 1) o (x_d W^T) + g o s (x_d A^T B^T),   x_d = dropout(x)
// with g = m / n and n_i = ||W_i + s (B A)_i|| detached, computed without the matrix W + s B A from
//   n_i^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i^T (A A^T) B_i   ([out, r] and [r, r] products only).
// The same device-generic code serves CPU and CUDA: the heavy work is in lora_linear's kernels and the GEMMs.
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>

#include "../common/products.h"
#include "../lora/lora_linear.h"

namespace peftops::dora {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

const auto& lora_forward() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftops::lora_linear_forward", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                         const Tensor&, double, double, const OptTensor&)>();
  return op;
}

const auto& lora_backward() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftops::lora_linear_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           double, double, const OptTensor&, std::array<bool, 4>)>();
  return op;
}

Tensor dropped(const Tensor& x, double p, const Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftops::dropout", "")
                       .typed<Tensor(const Tensor&, double, const Tensor&)>();
  return op.call(x, p, seed);
}

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_magnitude(const Tensor& weight, const Tensor& magnitude) {
  TORCH_CHECK_VALUE(magnitude.dim() == 1 && magnitude.size(0) == weight.size(0), "dora_linear: magnitude must be [",
                    weight.size(0), "], got shape ", magnitude.sizes());
  TORCH_CHECK_TYPE(magnitude.is_floating_point(), "dora_linear: magnitude must be floating point, got ",
                   magnitude.scalar_type());
  TORCH_CHECK_VALUE(magnitude.device() == weight.device(), "dora_linear: magnitude is on ", magnitude.device(),
                    " but weight is on ", weight.device());
}

// A row's squared norm may fall to this fraction of its bound before the identity's rounding shows in it.
constexpr double kCancellation = 0.25;

// ||W_i + s (B A)_i|| for every output row i, in the accumulation type. The identity's rounding is at most a few ulps
// of the triangle bound (||W_i|| + |s| sum_k |B_ik| ||A_k||)^2 (its products included): where the norm cancels well
// below that bound (an adapter that nearly undoes its row, a nearly rank-deficient A; rare in training, frequent
// with random weights and few input features) or is not finite, the row is recomputed from W_i + s (B A)_i itself,
// as peft forms it. Finding those rows costs one host sync (CUDA graphs cannot capture the op).
Tensor column_norms(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale) {
  const auto acc = at::toOpMathType(weight.scalar_type());
  const auto wa = at::mm(weight, lora_a.t()).to(acc);  // [out, r]
  const auto aa = at::mm(lora_a, lora_a.t()).to(acc);  // [r, r]
  const auto b = lora_b.to(acc);
  const auto w_norms = at::linalg_vector_norm(weight, 2, {1}, false, acc);
  const auto w2 = w_norms.square();
  // scaled by multiplication: 2 s and s^2 may exceed float as alphas where s does not
  const auto cross = at::mul(wa, b).sum(1).mul_(scale).mul_(2.0);
  const auto quad = at::mul(at::mm(b, aa), b).sum(1).mul_(scale).mul_(scale);
  auto n2 = at::add(w2, cross).add_(quad);
  const auto a_norms = at::linalg_vector_norm(lora_a, 2, {1}, false, acc);  // [r]
  const auto bound = at::mv(b.abs(), a_norms).mul_(std::abs(scale)).add_(w_norms).square_();
  const auto rows = at::nonzero(n2.lt(bound.mul_(kCancellation)).logical_or_(n2.isfinite().logical_not_()));
  if (rows.numel() > 0) {
    const auto r = rows.view(-1);
    const auto exact = at::addmm(weight.index_select(0, r).to(acc), lora_b.index_select(0, r).to(acc),
                                 lora_a.to(acc), 1.0, scale);
    n2.index_copy_(0, r, at::linalg_vector_norm(exact, 2, {1}, false, acc).square_());
  }
  return n2.clamp_min_(0).sqrt_();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_linear_forward(const Tensor& x, const Tensor& weight,
                                                               const OptTensor& bias, const Tensor& lora_a,
                                                               const Tensor& lora_b, const Tensor& magnitude,
                                                               double scale, double dropout_p, const OptTensor& seed) {
  lora::check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p, "dora_linear");
  check_magnitude(weight, magnitude);
  const auto norm = column_norms(weight, lora_a, lora_b, scale);
  const auto g = magnitude.to(norm.scalar_type()).div(norm).to(x.scalar_type());
  const bool drop = dropout_p > 0.0 && has(seed);
  // z = x_d W^T + s x_d A^T B^T by the fused LoRA op (x_d = x without dropout); kept for the magnitude gradient.
  const auto [z, t] = lora_forward().call(drop ? dropped(x, dropout_p, *seed) : x, weight, std::nullopt, lora_a,
                                          lora_b, scale, 0.0, std::nullopt);
  Tensor out;
  if (!drop) {
    out = at::mul(z, g);
    if (has(bias)) out.add_(*bias);
  } else {  // x W^T + b + (g - 1) o z + s t B^T
    const auto x2 = x.reshape({-1, x.size(-1)});
    out = has(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    add_scaled_product(out, t.to(x.scalar_type()), lora_b.t(), scale);
    out = out.view(z.sizes()).add_(at::mul(z, g.sub(1)));
  }
  return {out, z, t, norm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dora_linear_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& magnitude, const Tensor& z, const Tensor& t, const Tensor& norm, double scale, double dropout_p,
    const OptTensor& seed, std::array<bool, 5> output_mask) {
  const auto [need_x, need_a, need_b, need_m, need_bias] = output_mask;
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto dy = grad_out.reshape({-1, grad_out.size(-1)});
  const auto g = magnitude.to(norm.scalar_type()).div(norm).to(x.scalar_type());
  const bool drop = dropout_p > 0.0 && has(seed);
  const auto x_d = drop ? dropped(x, dropout_p, *seed) : x;
  // The LoRA-shaped part: grad g o dy through z = x_d W^T + s x_d A^T B^T.
  auto [dx, da, db, unused] = lora_backward().call(at::mul(grad_out, g), x_d, weight, lora_a, lora_b, t, scale, 0.0,
                                                   std::nullopt, {need_x, need_a, need_b, false});
  if (need_x && drop) {  // dx = dy W + mask o (dz - dy W) / (1 - p)
    const auto dyw = at::mm(dy, weight).view(x.sizes());
    dx = dyw.add_(dropped(dx.sub_(dyw), dropout_p, *seed));
  }
  const auto dm = need_m ? at::mul(dy, z.reshape({-1, z.size(-1)})).sum(0, false, norm.scalar_type()).div_(norm)
                               .to(magnitude.scalar_type())
                         : empty();
  return {need_x ? dx : empty(), need_a ? da : empty(), need_b ? db : empty(), dm,
          need_bias ? dy.sum(0) : empty()};
}

Tensor dora_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a,
                   const Tensor& lora_b, const Tensor& magnitude, double scale, double dropout_p, bool training) {
  lora::check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p, "dora_linear", training);
  check_magnitude(weight, magnitude);
  OptTensor seed;
  if (training && dropout_p > 0.0) {
    seed = at::randint(std::numeric_limits<int64_t>::max(), {}, x.options().dtype(at::kLong));
  }
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::dora_linear_forward", "")
                            .typed<decltype(dora_linear_forward)>();
  return std::get<0>(forward.call(x, weight, bias, lora_a, lora_b, magnitude, scale, seed ? dropout_p : 0.0, seed));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
        "float scale, float dropout_p=0.0, *, bool training=True) -> Tensor");
  // Saved for backward: z (the unscaled x_d W^T + s x_d A^T B^T, for the magnitude gradient), t and the norms.
  m.def("dora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
        "float scale, float dropout_p, Tensor? seed) -> (Tensor out, Tensor z, Tensor t, Tensor norm)");
  m.def("dora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor magnitude, Tensor z, Tensor t, Tensor norm, float scale, float dropout_p, Tensor? seed, "
        "bool[5] output_mask) -> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_magnitude, "
        "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("dora_linear", &dora_linear); }

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("dora_linear_forward", &dora_linear_forward);
  m.impl("dora_linear_backward", &dora_linear_backward);
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("dora_linear_forward", &dora_linear_forward);
  m.impl("dora_linear_backward", &dora_linear_backward);
}

}  // namespace peftops::dora
