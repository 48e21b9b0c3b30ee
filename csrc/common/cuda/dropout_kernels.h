#pragma once
#include <ATen/core/Tensor.h>

namespace peftops::cuda {

// dst (+)= keep(seed, index) / (1 - p) * src over 2-D [rows, cols] matrices with unit column stride; the mask is
// the Philox mask of csrc/common/philox.h, indexed row-major, seed read on the device (no host sync).
void dropout_apply(const at::Tensor& src, at::Tensor& dst, const at::Tensor& seed, double p, bool accumulate);

}  // namespace peftops::cuda
