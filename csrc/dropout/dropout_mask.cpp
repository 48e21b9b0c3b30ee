// The keep-mask that every op with dropout regenerates, exposed so tests can check it (CPU against CUDA,
// C++ against the pure-Python Philox) and the reference implementations can apply it.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/philox.h"

namespace peftops {

static at::Tensor dropout_keep_mask_cpu(c10::IntArrayRef size, double p, const at::Tensor& seed, int64_t offset) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_keep_mask: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout_keep_mask: seed must be one int64");
  Dropout d;
  d.seed = static_cast<uint64_t>(seed.item<int64_t>());
  d.offset = static_cast<uint64_t>(offset);
  d.threshold = dropout_threshold(p);
  auto mask = at::empty(size, seed.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  at::parallel_for(0, mask.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = d.keep(static_cast<uint64_t>(i));
  });
  return mask;
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("dropout_keep_mask(int[] size, float p, Tensor seed, int offset=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftops, CPU, m) { m.impl("dropout_keep_mask", &dropout_keep_mask_cpu); }

}  // namespace peftops
