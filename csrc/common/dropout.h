#pragma once
#include <ATen/core/Tensor.h>

#include "philox.h"

namespace peftops {

// The dropout of one call, read from its seed tensor on the host (CUDA kernels read the seed on the device):
// inactive when p = 0 or there is no seed.
Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, uint64_t offset = 0);

// A 2-D matrix whose rows are runs of contiguous elements: unit column stride, or one column (torch calls an
// [N, 1] view contiguous whatever its column stride, so .contiguous() keeps that stride).
inline bool unit_columns(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// dst = base + keep(seed, index) / (1 - p) * src over 2-D [rows, cols] matrices with unit column stride, base being
// dst itself (accumulate) or 0; the Philox mask of common/philox.h over src's row-major elements, on the tensors'
// device (CPU: common/cpu/row_pass.h, CUDA: common/cuda/dropout_kernels.cu). p = 0 or no seed keeps everything.
void dropout_apply(const at::Tensor& src, at::Tensor& dst, const std::optional<at::Tensor>& seed, double p,
                   bool accumulate);

// mask o x / (1 - p) as a new contiguous matrix, x [rows, cols] with unit column stride (transient: never saved).
at::Tensor dropped(const at::Tensor& x, const std::optional<at::Tensor>& seed, double p);

// Rank-r products whose [N, K] input x (any strides) goes through dropout first (LoRA's down-projection):
// the dropped x is never materialised on the CPU, only a cache-sized block of its rows at a time between the mask
// and the vendor GEMM (common/dropout_lowrank.cpp); CUDA composes dropout_apply and the GEMMs.
//   dropout_shrink:           (mask o x / (1 - p)) a^T  [N, r], a [r, K];
//   dropout_lowrank_backward: dx += mask o (u a) / (1 - p) in place when dx is defined, and returns
//                             u^T (mask o x / (1 - p))  [r, K] when want_da (else an undefined tensor), u [N, r];
//                             the mask is drawn once for both.
at::Tensor dropout_shrink(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& seed, double p);
at::Tensor dropout_lowrank_backward(const at::Tensor& x, const at::Tensor& dx, const at::Tensor& u,
                                    const at::Tensor& a, const std::optional<at::Tensor>& seed, double p,
                                    bool want_da);

}  // namespace peftops
