// The keep-mask that every op with dropout regenerates, exposed so tests can check it (CPU against CUDA,
// C++ against the pure-Python Philox) and the reference implementations can apply it.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/cpu/row_pass.h"
#include "../common/dropout.h"
#include "../common/philox.h"

namespace peftops {

static at::Tensor dropout_keep_mask_cpu(c10::IntArrayRef size, double p, const at::Tensor& seed, int64_t offset) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_keep_mask: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout_keep_mask: seed must be one int64");
  const Dropout d = make_dropout(p, seed, static_cast<uint64_t>(offset));  // p = 0: threshold 0, all kept
  auto mask = at::empty(size, seed.options().dtype(at::kBool));
  // rows of the last dimension through the kernels' own (vectorised) mask generator
  const int64_t K = mask.dim() ? mask.size(-1) : 1, N = K ? mask.numel() / K : 0;
  bool* out = mask.data_ptr<bool>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t begin, int64_t end) {
    std::vector<float> keep(K);
    for (int64_t n = begin; n < end; ++n) {
      cpu::row_keep(d, n, K, keep.data());
      for (int64_t k = 0; k < K; ++k) out[n * K + k] = keep[k] != 0.0f;
    }
  });
  return mask;
}

// mask o x / (1 - p) with the mask of `seed`, indexed as x's row-major elements: what every op with dropout
// regenerates, for compositions that need the dropped input itself (transiently, never saved).
static at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  if (x.numel() == 0) return x.clone();  // nothing to drop (and no [-1, 0] view to take)
  return dropped(x.contiguous().view({-1, x.dim() ? x.size(-1) : 1}), seed, p).view(x.sizes());
}

TORCH_LIBRARY_FRAGMENT(peftops, m) {
  m.def("dropout_keep_mask(int[] size, float p, Tensor seed, int offset=0) -> Tensor");
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("dropout", &dropout);
}

TORCH_LIBRARY_IMPL(peftops, CUDA, m) { m.impl("dropout", &dropout); }

}  // namespace peftops
