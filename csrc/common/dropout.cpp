// The device dispatch of the shared dropout, and its CPU kernel.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>

#include "cpu/row_pass.h"
#ifdef PEFTOPS_WITH_CUDA
#include "cuda/dropout_kernels.h"
#endif

namespace peftops {

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, uint64_t offset) {
  Dropout d;
  d.offset = offset;
  if (p > 0.0 && seed.has_value() && seed->defined()) {
    d.active = true;
    d.threshold = dropout_threshold(p);
    d.keep_scale = 1.0 / (1.0 - p);
    // read here on the host; CUDA kernels read their seed on the device and never come here with one
    TORCH_CHECK_VALUE(seed->is_cpu() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                      "dropout: the seed must be one CPU int64 for CPU inputs, got ", seed->numel(), " ",
                      seed->scalar_type(), " on ", seed->device());
    d.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return d;
}

void dropout_apply(const at::Tensor& src, at::Tensor& dst, const std::optional<at::Tensor>& seed, double p,
                   bool accumulate) {
  TORCH_CHECK(src.dim() == 2 && dst.sizes() == src.sizes() && unit_columns(src) && unit_columns(dst) &&
                  src.scalar_type() == dst.scalar_type(),
              "dropout_apply: expects two 2-D matrices of one shape and dtype with unit column stride");
  if (src.is_cuda()) {
#ifdef PEFTOPS_WITH_CUDA
    return cuda::dropout_apply(src, dst, seed, p, accumulate);
#else
    TORCH_CHECK(false, "peftops was built without CUDA kernels");
#endif
  }
  const Dropout d = make_dropout(p, seed);
  const int64_t N = src.size(0), K = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "dropout_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> keep(K, acc_t(1)), scratch(2 * K);
      for (int64_t n = begin; n < end; ++n) {
        if (d.active) cpu::row_keep(d, n, K, keep.data());
        cpu::masked_row(keep.data(), sp + n * src.stride(0), dp + n * dst.stride(0), K, accumulate, scratch.data());
      }
    });
  });
}

at::Tensor dropped(const at::Tensor& x, const std::optional<at::Tensor>& seed, double p) {
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  dropout_apply(x, y, seed, p, /*accumulate=*/false);
  return y;
}

}  // namespace peftops
