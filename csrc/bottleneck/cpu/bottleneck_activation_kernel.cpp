// The bottleneck's activation passes on the CPU, over the small [N, m] pre-activation (common/activations.h).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../../common/activations.h"
#include "../adapter_bottleneck.h"

namespace peftops::bottleneck {
namespace {

at::Tensor bottleneck_activation_cpu(const at::Tensor& a, int64_t activation, bool ones) {
  check_activation_args(a, activation);
  const auto ac = a.contiguous();
  const int64_t N = ac.size(0), m = ac.size(1), width = m + (ones ? 1 : 0);
  auto out = at::empty({N, width}, a.options());
  const auto act = static_cast<Activation>(activation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bottleneck_activation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = ac.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t k = 0; k < m; ++k) dst[n * width + k] = static_cast<scalar_t>(activate(act, static_cast<acc_t>(src[n * m + k])));
        if (ones) dst[n * width + m] = scalar_t(1);
      }
    });
  });
  return out;
}

at::Tensor bottleneck_activation_backward_cpu(const at::Tensor& grad, const at::Tensor& a, int64_t activation,
                                              double scale) {
  check_activation_args(a, activation, &grad);
  const auto gc = grad.contiguous(), ac = a.contiguous();
  auto out = at::empty(ac.sizes(), a.options());
  const auto act = static_cast<Activation>(activation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bottleneck_activation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *g = gc.const_data_ptr<scalar_t>(), *x = ac.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(scale);
    at::parallel_for(0, ac.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = static_cast<scalar_t>(activation_backward(act, static_cast<acc_t>(x[i]), s * static_cast<acc_t>(g[i])));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("bottleneck_activation", &bottleneck_activation_cpu);
  m.impl("bottleneck_activation_backward", &bottleneck_activation_backward_cpu);
}

}  // namespace peftops::bottleneck
