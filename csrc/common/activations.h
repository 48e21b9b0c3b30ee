#pragma once
// Activations and their derivatives, one definition for the CPU and CUDA kernels (computed in the
// accumulation type: float or double).
#include <cmath>

#include "macros.h"

namespace peftops {

enum class Activation : int { relu = 0, gelu = 1, gelu_tanh = 2, silu = 3 };

template <typename T>
PEFTOPS_HOST_DEVICE T activate(Activation act, T x) {
  switch (act) {
    case Activation::relu: return x < T(0) ? T(0) : x;  // NaN stays NaN, as torch.relu
    case Activation::gelu: return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
    case Activation::gelu_tanh: {
      const T inner = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + std::tanh(inner));
    }
    default: return x / (T(1) + std::exp(-x));  // silu
  }
}

// d activate / dx at x.
template <typename T>
PEFTOPS_HOST_DEVICE T activate_grad(Activation act, T x) {
  switch (act) {
    case Activation::relu: return x <= T(0) ? T(0) : T(1);  // at NaN the gradient passes, as torch's
    case Activation::gelu:
      return T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440))) +
             x * T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    case Activation::gelu_tanh: {
      const T k = T(0.79788456080286535588), c = T(0.044715);
      const T t = std::tanh(k * (x + c * x * x * x));
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3) * c * x * x);
    }
    default: {  // silu
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
  }
}

// The gradient through the activation, dy * activate'(x). ReLU selects, as torch's threshold_backward: where it is
// off the gradient is 0, even for a NaN or inf dy (0 * NaN would spread a NaN weight of an unused unit).
template <typename T>
PEFTOPS_HOST_DEVICE T activation_backward(Activation act, T x, T dy) {
  if (act == Activation::relu) return x <= T(0) ? T(0) : dy;
  return dy * activate_grad(act, x);
}

}  // namespace peftops
