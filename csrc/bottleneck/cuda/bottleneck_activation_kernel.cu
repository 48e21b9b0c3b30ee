// The bottleneck's activation passes on CUDA: the same math as the CPU kernels (common/activations.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../../common/activations.h"
#include "../adapter_bottleneck.h"

namespace peftops::bottleneck {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8)); }

template <typename scalar_t>
__global__ void activation_kernel(const scalar_t* __restrict__ a, scalar_t* __restrict__ out, int64_t rows, int64_t m,
                                  int64_t width, Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * width;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / width, k = i % width;
    out[i] = k < m ? static_cast<scalar_t>(activate(act, static_cast<acc_t>(a[n * m + k]))) : scalar_t(1);
  }
}

template <typename scalar_t>
__global__ void activation_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ a,
                                           scalar_t* __restrict__ out, int64_t total, Activation act, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(
        activation_backward(act, static_cast<acc_t>(a[i]), static_cast<acc_t>(scale) * static_cast<acc_t>(grad[i])));
  }
}

at::Tensor bottleneck_activation_cuda(const at::Tensor& a, int64_t activation, bool ones) {
  check_activation_args(a, activation);
  c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous();
  const int64_t rows = ac.size(0), m = ac.size(1), width = m + (ones ? 1 : 0);
  auto out = at::empty({rows, width}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bottleneck_activation_cuda", [&] {
    activation_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ac.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, m, width, static_cast<Activation>(activation));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor bottleneck_activation_backward_cuda(const at::Tensor& grad, const at::Tensor& a, int64_t activation,
                                               double scale) {
  check_activation_args(a, activation, &grad);
  c10::cuda::CUDAGuard guard(a.device());
  const auto gc = grad.contiguous(), ac = a.contiguous();
  auto out = at::empty(ac.sizes(), a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bottleneck_activation_backward_cuda", [&] {
    activation_backward_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out.numel(),
        static_cast<Activation>(activation), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("bottleneck_activation", &bottleneck_activation_cuda);
  m.impl("bottleneck_activation_backward", &bottleneck_activation_backward_cuda);
}

}  // namespace peftops::bottleneck
