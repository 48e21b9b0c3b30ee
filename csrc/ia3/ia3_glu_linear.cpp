// IA3 on the down projection of a gated feed-forward block (Llama's MLP: down(act(gate(x)) * up(x))), where peft
// scales the down projection's input: y = ((a o b) o l) W^T + bias, a = act(gate(x)), b = up(x).
// Saved: a and b only, which the block's own product would keep anyway; its input a o b (what ia3_linear would keep)
// is recomputed. Backward, with g = dy W: da = g o l o b, db = g o l o a, dl = sum_rows(g o a o b).
// The forward is one device-generic composition of ATen ops (the GEMMs are the vendor's) for CPU and CUDA; so is the
// backward on CUDA, while the CPU's fuses everything after its GEMM into one row pass.
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "ia3_linear.h"
#include "../common/checks.h"

namespace peftops::ia3 {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

void check_glu_inputs(const Tensor& a, const Tensor& b, const Tensor& weight, const OptTensor& bias,
                      const Tensor& scale) {
  check_inputs(a, weight, bias, scale, /*feedforward=*/true, "ia3_glu_linear", "gate");
  TORCH_CHECK_VALUE(b.sym_sizes() == a.sym_sizes(), "ia3_glu_linear: up has shape ", b.sym_sizes(), " but gate has ",
                    a.sym_sizes());
  check_like(b, a, "ia3_glu_linear", "up", "gate");
}

Tensor rows(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The scaled input (a o b) o l, in the order peft computes it (the product rounded first).
Tensor scaled_input(const Tensor& a2, const Tensor& b2, const Tensor& scale) { return at::mul(a2, b2).mul_(scale); }

Tensor ia3_glu_linear_forward(const Tensor& a, const Tensor& b, const Tensor& weight, const OptTensor& bias,
                              const Tensor& scale) {
  check_glu_inputs(a, b, weight, bias, scale);
  const auto xs = scaled_input(rows(a), rows(b), scale);
  auto y = bias.has_value() && bias->defined() ? at::addmm(*bias, xs, weight.t()) : at::mm(xs, weight.t());
  auto shape = a.sizes().vec();
  shape.back() = weight.size(0);
  return y.view(shape);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ia3_glu_linear_backward(const Tensor& grad_out, const Tensor& a,
                                                                   const Tensor& b, const Tensor& weight,
                                                                   const Tensor& scale, std::array<bool, 4> mask) {
  const auto [need_a, need_b, need_bias, need_scale] = mask;
  const auto dy = rows(grad_out), a2 = rows(a), b2 = rows(b);
  const auto acc = at::toOpMathType(a.scalar_type());
  const auto empty = [&] { return at::empty({0}, a.options()); };
  Tensor da = empty(), db = empty(), dbias = empty(), dl = empty();
  if (need_a || need_b || need_scale) {
    const auto g = at::mm(dy, weight);  // the gradient of the scaled input
    if (need_scale) dl = at::mul(g.to(acc), at::mul(a2, b2)).sum(0).to(scale.scalar_type());  // product in fp32
    if (need_a || need_b) {
      const auto gl = at::mul(g, scale);
      if (need_a) da = at::mul(gl, b2).view(a.sizes());
      if (need_b) db = at::mul(gl, a2).view(b.sizes());
    }
  }
  if (need_bias) dbias = dy.sum(0, false, acc).to(a.scalar_type());
  return {da, db, dbias, dl};
}

Tensor ia3_glu_linear(const Tensor& gate, const Tensor& up, const Tensor& weight, const OptTensor& bias,
                      const Tensor& ia3_scale) {
  const auto scale = scale_vector(ia3_scale, /*feedforward=*/true, "ia3_glu_linear");
  check_glu_inputs(gate, up, weight, bias, scale);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::ia3_glu_linear_forward", "")
                            .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                          const Tensor&)>();
  return forward.call(gate, up, weight, bias, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  // ((gate o up) o l) W^T + bias: a gated feed-forward block's down projection with IA3 input scaling, l [in].
  m.def("ia3_glu_linear(Tensor gate, Tensor up, Tensor weight, Tensor? bias, Tensor ia3_scale) -> Tensor");
  m.def("ia3_glu_linear_forward(Tensor gate, Tensor up, Tensor weight, Tensor? bias, Tensor ia3_scale) -> Tensor");
  // Saves gate and up only (no copy of their product).
  m.def("ia3_glu_linear_backward(Tensor grad_out, Tensor gate, Tensor up, Tensor weight, Tensor ia3_scale, "
        "bool[4] output_mask) -> (Tensor grad_gate, Tensor grad_up, Tensor grad_bias, Tensor grad_scale)");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("ia3_glu_linear", &ia3_glu_linear); }

TORCH_LIBRARY_IMPL(peftops, CPU, m) {  // the CPU backward is one fused row pass (cpu/ia3_linear_kernel.cpp)
  m.impl("ia3_glu_linear_forward", &ia3_glu_linear_forward);
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("ia3_glu_linear_forward", &ia3_glu_linear_forward);
  m.impl("ia3_glu_linear_backward", &ia3_glu_linear_backward);
}

}  // namespace peftops::ia3
