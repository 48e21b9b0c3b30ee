#pragma once
// prefix_attention's shapes and its CPU kernel (cpu/prefix_attention_kernel.cpp); the op, its checks and the dense
// path that CUDA runs are in prefix_attention.cpp.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace peftops::prefix {

struct Shapes {
  int64_t B, Hq, Hkv, G, L, S, P, D;  // G = Hq / Hkv query heads per kv head
  double scale;
};

namespace cpu {

// out [B, Hq, L, D] laid out as SDPA's [B, L, Hq, D], and the log-sum-exp [B, Hq, L] over every visible key
// (float; double for double inputs).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& pk, const at::Tensor& pv,
                                           const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                           const Shapes& s);

// (dq, dk, dv) in SDPA's layout, (dprefix_k, dprefix_v) contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
    const at::Tensor& pv, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, const Shapes& s);

}  // namespace cpu
}  // namespace peftops::prefix
