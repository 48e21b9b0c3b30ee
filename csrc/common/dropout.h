#pragma once
#include <ATen/core/Tensor.h>

#include "philox.h"

namespace peftops {

// dst = base + keep(seed, index) / (1 - p) * src over 2-D [rows, cols] matrices with unit column stride, base being
// dst itself (accumulate) or 0; the Philox mask of common/philox.h over src's row-major elements, on the tensors'
// device (CPU: common/cpu/row_pass.h, CUDA: common/cuda/dropout_kernels.cu). p = 0 or no seed keeps everything.
// The dropout of one call, read from its seed tensor on the host (CUDA kernels read the seed on the device):
// inactive when p = 0 or there is no seed.
Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, uint64_t offset = 0);

void dropout_apply(const at::Tensor& src, at::Tensor& dst, const std::optional<at::Tensor>& seed, double p,
                   bool accumulate);

}  // namespace peftops
