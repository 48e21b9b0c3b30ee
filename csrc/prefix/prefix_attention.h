#pragma once
// prefix_attention's shapes and its kernels (cpu/prefix_attention_kernel.cpp, cuda/prefix_attention_kernel.cu, the
// same interface); the op, its checks and the dense path are in prefix_attention.cpp.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../common/philox.h"

namespace peftops::prefix {

struct Shapes {
  int64_t B, Hq, Hkv, G, L, S, P, D;  // G = Hq / Hkv query heads per kv head
  double scale;
};

// Dropout on the attention probabilities, p > 0 with a seed or none: element (b, hq, l, j) of the [B, Hq, L, P + S]
// probabilities over [prefix | sequence] keys is kept by the Philox of common/philox.h at that row-major index, so
// every path (CPU kernel, CUDA kernels, dense) drops the same elements, in forward and in backward.
struct AttentionDropout {
  double p = 0.0;
  std::optional<at::Tensor> seed;
  bool active() const { return p > 0.0 && seed.has_value() && seed->defined(); }
};

// The dropout with its seed read on the host, for the CPU kernel and the dense path (the CUDA kernels read the seed
// on the device): an inactive Dropout when there is none.
Dropout host_dropout(const AttentionDropout& drop);

// out [B, Hq, L, D] laid out as SDPA's [B, L, Hq, D], and the log-sum-exp [B, Hq, L] over every visible key
// (float; double for double inputs).
using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& pk, const at::Tensor& pv,
                                                   const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                   const Shapes& s, const AttentionDropout& drop);

// (dq, dk, dv) in SDPA's layout, (dprefix_k, dprefix_v) contiguous.
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
    const at::Tensor& pv, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, const Shapes& s, const AttentionDropout& drop);

// One interface, one implementation per device.
namespace cpu {
Forward forward;
Backward backward;
}  // namespace cpu

#ifdef PEFTOPS_WITH_CUDA
namespace cuda {
Forward forward;
Backward backward;
}  // namespace cuda
#endif
}  // namespace peftops::prefix
