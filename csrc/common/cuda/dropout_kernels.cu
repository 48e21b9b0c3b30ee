// The CUDA side of the shared counter-based dropout: the same Philox as the CPU kernels (common/philox.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../dropout.h"
#include "dropout_kernels.h"

namespace peftops::cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t groups) {
  return static_cast<int>(std::min<int64_t>((groups + kThreads - 1) / kThreads, 65535LL * 8));
}

// One thread per group of 4 consecutive elements: one Philox block serves all four.
template <typename scalar_t>
__global__ void dropout_apply_kernel(const scalar_t* __restrict__ src, int64_t lds, const scalar_t* __restrict__ bias,
                                     const scalar_t* __restrict__ residual, int64_t ldr, scalar_t* __restrict__ dst,
                                     int64_t ldd, int64_t rows, int64_t cols, const int64_t* __restrict__ seed,
                                     uint32_t threshold, double keep_scale, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint64_t total = static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols);
  const uint64_t key = seed ? static_cast<uint64_t>(*seed) : 0;
  for (uint64_t g = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; g * 4 < total;
       g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const Philox4 block = seed ? philox4x32_10(g, 0, key) : Philox4{0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu};
#pragma unroll
    for (uint64_t lane = 0; lane < 4; ++lane) {
      const uint64_t e = g * 4 + lane;
      if (e >= total) break;
      const int64_t n = static_cast<int64_t>(e / cols), k = static_cast<int64_t>(e % cols);
      const acc_t scale = philox_word(block, lane) >= threshold ? static_cast<acc_t>(keep_scale) : acc_t(0);
      acc_t v = static_cast<acc_t>(src[n * lds + k]);
      if (bias) v += static_cast<acc_t>(bias[k]);
      scalar_t* out = dst + n * ldd + k;
      const acc_t base = residual ? static_cast<acc_t>(residual[n * ldr + k])
                                  : (accumulate ? static_cast<acc_t>(*out) : acc_t(0));
      *out = static_cast<scalar_t>(base + scale * v);
    }
  }
}

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t total, const int64_t* __restrict__ seed,
                                 uint64_t offset, uint32_t threshold) {
  Dropout d;
  d.seed = static_cast<uint64_t>(*seed);
  d.offset = offset;
  d.threshold = threshold;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = d.keep(static_cast<uint64_t>(i));
  }
}

at::Tensor dropout_keep_mask_cuda(c10::IntArrayRef size, double p, const at::Tensor& seed, int64_t offset) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_keep_mask: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout_keep_mask: seed must be one int64");
  c10::cuda::CUDAGuard guard(seed.device());
  auto mask = at::empty(size, seed.options().dtype(at::kBool));
  const auto seed_c = seed.contiguous();
  if (mask.numel() > 0) {
    keep_mask_kernel<<<blocks_for(mask.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mask.data_ptr<bool>(), mask.numel(), seed_c.const_data_ptr<int64_t>(), static_cast<uint64_t>(offset),
        dropout_threshold(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return mask;
}

}  // namespace

void dropout_apply(const at::Tensor& src, at::Tensor& dst, const std::optional<at::Tensor>& seed, double p,
                   bool accumulate, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  // CPU data reaches this CUDA kernel when only the seed is on the GPU: the dispatcher follows the seed.
  TORCH_CHECK_VALUE(src.is_cuda() && dst.device() == src.device(), "dropout: the input is on ", src.device(),
                    " but the seed is on CUDA: put them on one device");
  TORCH_CHECK(src.dim() == 2 && dst.sizes() == src.sizes() && unit_columns(src) && unit_columns(dst),
              "dropout_apply: expects two 2-D matrices of one shape with unit column stride");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "dropout_apply: src and dst dtypes differ");
  const bool masked = p > 0.0 && seed.has_value() && seed->defined();
  TORCH_CHECK_VALUE(!masked || (seed->device() == src.device() && seed->scalar_type() == at::kLong &&
                                 seed->numel() == 1),
                    "dropout: the seed must be one int64 on the input's device (", src.device(), ")");
  const bool has_bias = bias.has_value() && bias->defined(), has_res = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_bias || (bias->is_contiguous() && bias->numel() == src.size(1)), "dropout_apply: bad bias");
  TORCH_CHECK(!has_res || (residual->sizes() == src.sizes() && unit_columns(*residual)), "dropout_apply: bad residual");
  if (src.numel() == 0) return;
  c10::cuda::CUDAGuard guard(src.device());
  const auto seed_c = masked ? seed->contiguous() : at::Tensor();
  const int64_t groups = (src.numel() + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "dropout_apply_cuda", [&] {
    dropout_apply_kernel<scalar_t><<<blocks_for(groups), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), src.stride(0), has_bias ? bias->const_data_ptr<scalar_t>() : nullptr,
        has_res ? residual->const_data_ptr<scalar_t>() : nullptr, has_res ? residual->stride(0) : 0,
        dst.data_ptr<scalar_t>(), dst.stride(0), src.size(0), src.size(1),
        masked ? seed_c.const_data_ptr<int64_t>() : nullptr, masked ? dropout_threshold(p) : 0u,
        masked ? 1.0 / (1.0 - p) : 1.0, accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cuda);
}

}  // namespace peftops::cuda
