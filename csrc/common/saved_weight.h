#pragma once
// What an autograd node keeps of a frozen weight that its backward reads only for dx (and for sizes).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

namespace peftops {

// The weight when x will get a gradient; else a one-element stand-in with its sizes, dtype and device. Without
// autocast the weight is the parameter and keeping it costs nothing, but under autocast it is a fresh 16-bit copy,
// which nn.Linear too keeps only when x needs a gradient.
inline at::Tensor weight_for_dx(const at::Tensor& weight, const at::Tensor& x) {
  return x.requires_grad() ? weight : at::zeros({1}, weight.options()).expand_symint(weight.sym_sizes());
}

}  // namespace peftops
