// The bottleneck adapter (Houlsby / Pfeiffer / parallel): y = residual + s (f(h Wd^T + bd) Wu^T + bu).
// Device-generic composition around the vendor GEMMs, with the activation passes as hand-written kernels
// (cpu/, cuda/) over the small [N, m] bottleneck:
//   forward:  a = h Wd^T + bd (saved); y = residual + s [f(a) | 1] [Wu | bu]^T, one GEMM writing y once
//             (the residual read in its epilogue, the bias as one more column of the bottleneck);
//   backward: [dWu | dbu] = s dy^T [f(a) | 1] (one GEMM), da = s (dy Wu) o f'(a), dWd = da^T h, dbd = 1^T da,
//             dh = da Wd (+ dy when the residual is h, in the same GEMM). Saved: h and a only; with save_output
//             (residual h), y instead of h, which the model's next layer keeps anyway: backward recovers
//             h = y - s [f(a) | 1] [Wu | bu]^T (autograd/).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "../common/activations.h"
#include "../common/checks.h"
#include "../common/products.h"
#include "adapter_bottleneck.h"

namespace peftops::bottleneck {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

Tensor rows(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

int64_t activation_code(c10::string_view name) {
  if (name == "relu") return static_cast<int64_t>(Activation::relu);
  if (name == "gelu") return static_cast<int64_t>(Activation::gelu);
  if (name == "gelu_tanh") return static_cast<int64_t>(Activation::gelu_tanh);
  if (name == "silu") return static_cast<int64_t>(Activation::silu);
  TORCH_CHECK_VALUE(false, "adapter_bottleneck: activation must be one of relu, gelu, gelu_tanh, silu, got '",
                    std::string(name), "'");
}

void check_inputs(const Tensor& h, const Tensor& w_down, const OptTensor& b_down, const Tensor& w_up,
                  const OptTensor& b_up, const OptTensor& residual) {
  TORCH_CHECK_VALUE(h.dim() >= 1 && h.sym_size(-1) >= 1,
                    "adapter_bottleneck: h must have shape [..., d] with d >= 1, got ", h.sym_sizes());
  TORCH_CHECK_VALUE(w_down.dim() == 2 && w_down.size(1) == h.sym_size(-1), "adapter_bottleneck: w_down must be [m, ",
                    h.sym_size(-1), "], got shape ", w_down.sizes());
  const auto m = w_down.size(0);
  TORCH_CHECK_VALUE(m >= 1, "adapter_bottleneck: the bottleneck size m must be >= 1");
  TORCH_CHECK_VALUE(w_up.dim() == 2 && w_up.size(0) >= 1 && w_up.size(1) == m, "adapter_bottleneck: w_up must be [d_out, ", m,
                    "], got shape ", w_up.sizes());
  const auto d_out = w_up.size(0);
  if (has(residual)) {
    TORCH_CHECK_VALUE(residual->dim() == h.dim() && residual->sym_size(-1) == d_out &&
                          residual->sym_sizes().slice(0, h.dim() - 1) == h.sym_sizes().slice(0, h.dim() - 1),
                      "adapter_bottleneck: residual must be h's shape with ", d_out, " features, got ",
                      residual->sym_sizes());
  } else {
    TORCH_CHECK_VALUE(d_out == h.sym_size(-1), "adapter_bottleneck: w_up maps to ", d_out, " features but the default "
                      "residual h has ", h.sym_size(-1), "; pass residual= of that width");
  }
  TORCH_CHECK_VALUE(!has(b_down) || (b_down->dim() == 1 && b_down->size(0) == m), "adapter_bottleneck: b_down must be [",
                    m, "]");
  TORCH_CHECK_VALUE(!has(b_up) || (b_up->dim() == 1 && b_up->size(0) == d_out), "adapter_bottleneck: b_up must be [",
                    d_out, "]");
  check_float(h, "adapter_bottleneck", "h");
  const std::pair<OptTensor, const char*> others[] = {
      {w_down, "w_down"}, {b_down, "b_down"}, {w_up, "w_up"}, {b_up, "b_up"}, {residual, "residual"}};
  for (const auto& [t, name] : others) {
    if (has(t)) check_like(*t, h, "adapter_bottleneck", name, "h");
  }
}

const auto& activation_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftops::bottleneck_activation", "")
                       .typed<Tensor(const Tensor&, int64_t, bool)>();
  return op;
}

std::tuple<Tensor, Tensor> adapter_bottleneck_forward(const Tensor& h, const Tensor& w_down, const OptTensor& b_down,
                                                      const Tensor& w_up, const OptTensor& b_up, int64_t activation,
                                                      double scale, const OptTensor& residual,
                                                      bool /*save_output: for autograd only*/) {
  check_inputs(h, w_down, b_down, w_up, b_up, residual);
  const auto h2 = rows(h);
  const auto a = has(b_down) ? at::addmm(*b_down, h2, w_down.t()) : at::mm(h2, w_down.t());
  auto out_shape = h.sizes().vec();
  out_shape.back() = w_up.size(0);
  auto y = add_update(has(residual) ? rows(*residual) : h2, a, w_up, b_up, activation, scale);
  return {y.view(out_shape), a};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_bottleneck_backward(
    const Tensor& grad_out, const Tensor& h, const Tensor& a, const Tensor& w_down, const Tensor& w_up,
    int64_t activation, double scale, bool residual_is_h, bool has_b_up, std::array<bool, 5> output_mask) {
  const auto [need_h, need_wd, need_bd, need_wu, need_bu] = output_mask;
  const auto empty = [&] { return at::empty({0}, h.options()); };
  const auto dy = rows(grad_out), h2 = rows(h);
  Tensor dh = empty(), dwd = empty(), dbd = empty(), dwu = empty(), dbu = empty();
  // s goes into the products (common/products.h), as PyTorch's autograd scales dy first: a 16-bit dy^T f(a) or dy Wu
  // can overflow before a small s would bring it back
  if (need_wu || need_bu) {  // [dWu | dbu] = s dy^T [f(a) | 1]
    const auto grad_up = scaled_product(dy.t(), activation_op().call(a, activation, has_b_up), scale);
    if (need_wu) dwu = grad_up.narrow(1, 0, w_up.size(1)).contiguous();
    if (need_bu) dbu = grad_up.select(1, w_up.size(1)).contiguous();
  }
  if (need_h || need_wd || need_bd) {
    static auto grad_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("peftops::bottleneck_activation_backward", "")
                              .typed<Tensor(const Tensor&, const Tensor&, int64_t, double)>();
    const auto da = grad_op.call(scaled_product(dy, w_up, scale), a, activation, 1.0);  // s (dy Wu) o f'(a)
    if (need_wd) dwd = at::mm(da.t(), h2);
    if (need_bd) dbd = da.sum(0);
    if (need_h) dh = (residual_is_h ? at::addmm(dy, da, w_down) : at::mm(da, w_down)).view(h.sizes());
  }
  return {dh, dwd, dbd, dwu, dbu};
}

Tensor adapter_bottleneck(const Tensor& h, const Tensor& w_down, const OptTensor& b_down, const Tensor& w_up,
                          const OptTensor& b_up, c10::string_view activation, double scale, const OptTensor& residual,
                          bool save_output) {
  check_inputs(h, w_down, b_down, w_up, b_up, residual);  // before dispatch: a meta argument would pick the fake kernel
  const auto code = activation_code(activation);
  check_scale(scale, h, "adapter_bottleneck");
  TORCH_CHECK_VALUE(!save_output || !has(residual), "adapter_bottleneck: save_output=True recovers h from the "
                    "output, which needs the residual to be h (residual=None)");
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("peftops::adapter_bottleneck_forward", "")
                            .typed<decltype(adapter_bottleneck_forward)>();
  return std::get<0>(forward.call(h, w_down, b_down, w_up, b_up, code, scale, residual, save_output));
}

}  // namespace

at::Tensor add_update(const Tensor& base, const Tensor& a, const Tensor& w_up, const OptTensor& b_up,
                      int64_t activation, double scale) {
  const auto fa = activation_op().call(a, activation, has(b_up));  // [N, m (+1 column of ones)]
  const auto wu = has(b_up) ? at::cat({w_up, b_up->unsqueeze(1)}, 1) : w_up;
  auto out = base.clone(at::MemoryFormat::Contiguous);
  add_scaled_product(out, fa, wu.t(), scale);  // scale 0 keeps a NaN in the adapter, as peers' scale * up(...) does
  return out;
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("adapter_bottleneck(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, *, "
        "str activation=\"relu\", float scale=1.0, Tensor? residual=None, bool save_output=False) -> Tensor");
  // activation: 0 relu, 1 gelu, 2 gelu_tanh, 3 silu. a = h Wd^T + bd is saved for backward.
  m.def("adapter_bottleneck_forward(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
        "int activation, float scale, Tensor? residual, bool save_output) -> (Tensor out, Tensor a)");
  m.def("adapter_bottleneck_backward(Tensor grad_out, Tensor h, Tensor a, Tensor w_down, Tensor w_up, int activation, "
        "float scale, bool residual_is_h, bool has_b_up, bool[5] output_mask) -> "
        "(Tensor grad_h, Tensor grad_w_down, Tensor grad_b_down, Tensor grad_w_up, Tensor grad_b_up)");
  // f(a), with a trailing column of ones when ones=True; and s * grad o f'(a).
  m.def("bottleneck_activation(Tensor a, int activation, bool ones) -> Tensor");
  m.def("bottleneck_activation_backward(Tensor grad, Tensor a, int activation, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftops, CompositeImplicitAutograd, m) { m.impl("adapter_bottleneck", &adapter_bottleneck); }

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("adapter_bottleneck_forward", &adapter_bottleneck_forward);
  m.impl("adapter_bottleneck_backward", &adapter_bottleneck_backward);
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("adapter_bottleneck_forward", &adapter_bottleneck_forward);
  m.impl("adapter_bottleneck_backward", &adapter_bottleneck_backward);
}

}  // namespace peftops::bottleneck
