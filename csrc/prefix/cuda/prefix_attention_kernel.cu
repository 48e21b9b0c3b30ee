// prefix_attention on CUDA (KERNELS.md, "Prefix attention"): tiled online-softmax kernels over the keys
// [prefix | the row's own], with the shared prefix read in place from its one [Hkv, P, D] tensor by every batch row
// (through L2: never expanded or copied per row). The two segments are one online softmax, which is their LSE merge
// done key by key. One thread per query row (forward, dq) or per key (dk, dv); the tiles of keys or query rows that a
// block's threads share are staged in shared memory in float32, zero-padded to the head-dim bucket kD so that every
// loop over the head dim is unrolled into registers (keys and rows go one at a time, which keeps the code small). No
// [L, P + S] matrix exists, forward or backward: backward recomputes p = exp(z - lse) from the saved merged LSE
// (FlashAttention's formulas), and the shared prefix's gradients are per-batch-row partials summed once. Attention
// dropout draws each (row, key) element's keep from the shared Philox where it is used (keep_of). CUDA cores,
// not tensor cores: a first tiled kernel, checked on a GPU against the reference and against the dense path
// (PEFTOPS_PREFIX_DENSE=1), which float64 also takes.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "../prefix_attention.h"
#include "tiles.cuh"

namespace peftops::prefix::cuda {
namespace {

using Tensor = at::Tensor;

// The dtypes of PEFTOPS_PREFIX_FOR_EACH (tiles.cuh).
#define PEFTOPS_PREFIX_CASES(...)                  \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

// The head-dim bucket: every D in [1, 256] runs as the next of 64, 128 or 256, zero-padded.
template <typename F>
void with_head_dim_bucket(int64_t D, F&& f) {
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

template <typename scalar_t>
Operands<scalar_t> operands(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                            const Visible& vis, const Shapes& s, const AttentionDropout& drop) {
  const bool dropping = drop.active();
  return {strided(q, q.const_data_ptr<scalar_t>()),
          strided(k, k.const_data_ptr<scalar_t>()),
          strided(v, v.const_data_ptr<scalar_t>()),
          strided(pk, pk.const_data_ptr<scalar_t>()),
          strided(pv, pv.const_data_ptr<scalar_t>()),
          vis,
          s.Hkv,
          s.G,
          s.P,
          s.D,
          s.scale,
          dropping ? drop.seed->const_data_ptr<int64_t>() : nullptr,
          dropping ? dropout_threshold(drop.p) : 0u,
          dropping ? 1.0 / (1.0 - drop.p) : 1.0};
}

// [B, H, n, D] laid out as [B, n, H, D] (SDPA's layout, which the fake kernels promise).
Tensor sdpa_layout(const Tensor& like, int64_t H, int64_t n) {
  return at::empty({like.size(0), n, H, like.size(3)}, like.options()).transpose(1, 2);
}

dim3 grid(int64_t rows, int64_t heads, int64_t batch) {
  TORCH_CHECK_VALUE(heads <= 65535 && batch <= 65535, "prefix_attention: CUDA takes at most 65535 heads and batch "
                    "rows, got ", heads, " and ", batch);
  return dim3(static_cast<unsigned>((rows + kThreads - 1) / kThreads), static_cast<unsigned>(heads),
              static_cast<unsigned>(batch));
}

const bool* mask_data(const std::optional<Tensor>& mask, Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.const_data_ptr<bool>();
}

}  // namespace

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                                   const Tensor& pv, const std::optional<Tensor>& attn_mask, bool is_causal,
                                   const Shapes& s, const AttentionDropout& drop) {
  c10::cuda::CUDAGuard guard(q.device());
  Tensor mask_holder;
  const Visible vis{s.L, s.S, is_causal, mask_data(attn_mask, mask_holder)};
  auto out = sdpa_layout(q, s.Hq, s.L);
  auto lse = at::empty({s.B, s.Hq, s.L}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_SWITCH(q.scalar_type(), "prefix_attention_cuda_forward", PEFTOPS_PREFIX_CASES([&] {
    with_head_dim_bucket(s.D, [&](auto kD) {
      launch_forward<scalar_t, decltype(kD)::value>(grid(s.L, s.Hq, s.B), c10::cuda::getCurrentCUDAStream(),
                                                    operands<scalar_t>(q, k, v, pk, pv, vis, s, drop),
                                                    strided(out, out.data_ptr<scalar_t>()),
                                                    lse.data_ptr<acc_of<scalar_t>>());
    });
  }));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& pk, const Tensor& pv,
                                                            const Tensor& out, const Tensor& lse,
                                                            const std::optional<Tensor>& attn_mask, bool is_causal,
                                                            const Shapes& s, const AttentionDropout& drop) {
  c10::cuda::CUDAGuard guard(q.device());
  Tensor mask_holder;
  const Visible vis{s.L, s.S, is_causal, mask_data(attn_mask, mask_holder)};
  const auto acc = at::toOpMathType(q.scalar_type());
  auto dq = sdpa_layout(q, s.Hq, s.L), dk = sdpa_layout(k, s.Hkv, s.S), dv = sdpa_layout(k, s.Hkv, s.S);
  // the prefix's gradients per batch row: a per-row prefix's own, a shared one's partials (summed below)
  auto dpk = at::zeros({s.B, s.Hkv, s.P, s.D}, q.options().dtype(acc)), dpv = at::zeros_like(dpk);
  if (q.numel() == 0) {  // no query row: nothing reaches the keys
    dk.zero_();
    dv.zero_();
  } else {
    const auto lse_c = lse.to(acc).contiguous();
    auto delta = at::empty({s.B, s.Hq, s.L}, lse_c.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_SWITCH(q.scalar_type(), "prefix_attention_cuda_backward", PEFTOPS_PREFIX_CASES([&] {
      using acc_t = acc_of<scalar_t>;
      const auto a = operands<scalar_t>(q, k, v, pk, pv, vis, s, drop);
      const auto dout = strided(grad_out, grad_out.const_data_ptr<scalar_t>());
      with_head_dim_bucket(s.D, [&](auto kD) {
        constexpr int D = decltype(kD)::value;
        launch_grad_q<scalar_t, D>(grid(s.L, s.Hq, s.B), stream, a, dout, strided(out, out.const_data_ptr<scalar_t>()),
                                   lse_c.const_data_ptr<acc_t>(), strided(dq, dq.data_ptr<scalar_t>()),
                                   delta.data_ptr<acc_t>());
        launch_grad_kv<scalar_t, D>(grid(s.P + s.S, s.Hkv, s.B), stream, a, dout, lse_c.const_data_ptr<acc_t>(),
                                    delta.const_data_ptr<acc_t>(), strided(dk, dk.data_ptr<scalar_t>()),
                                    strided(dv, dv.data_ptr<scalar_t>()), dpk.data_ptr<acc_t>(), dpv.data_ptr<acc_t>());
      });
    }));
  }
  const auto dt = q.scalar_type();
  const auto reduce = [&](const Tensor& g) { return (pk.dim() == 3 ? g.sum(0) : g).to(dt).contiguous(); };
  return {dq, dk, dv, reduce(dpk), reduce(dpv)};
}

}  // namespace peftops::prefix::cuda
