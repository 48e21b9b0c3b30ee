#pragma once
#include <ATen/core/Tensor.h>

namespace peftops::cuda {

// dst = base + keep(seed, index) / (1 - p) * (src + bias) over 2-D [rows, cols] matrices with unit column stride,
// where base is `residual` when given, else dst itself (accumulate) or 0. The mask is the Philox mask of
// common/philox.h, indexed row-major, its seed read on the device (no host sync); p = 0 (or no seed) keeps all.
void dropout_apply(const at::Tensor& src, at::Tensor& dst, const std::optional<at::Tensor>& seed, double p,
                   bool accumulate, const std::optional<at::Tensor>& bias = std::nullopt,
                   const std::optional<at::Tensor>& residual = std::nullopt);

}  // namespace peftops::cuda
