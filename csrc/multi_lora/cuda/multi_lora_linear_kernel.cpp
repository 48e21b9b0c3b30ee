// Many LoRA adapters in one batch on CUDA: the base product once (cuBLAS), then per adapter segment a gathered
// rank-r shrink and expand (cuBLAS) scattered back in place with index_add_. The segment layout is built on the
// host (one small device-to-host copy of the index per call).
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../multi_lora_linear.h"

namespace peftops::multi_lora {
namespace {

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scales, const at::Tensor& adapter_index) {
  check_inputs(x, weight, bias, lora_a, lora_b, scales, adapter_index);
  c10::cuda::CUDAGuard guard(x.device());
  const auto seg = make_segments(adapter_index, scales);
  const auto rows_all = seg.rows.to(x.device());
  const auto x2 = x.reshape({-1, x.size(-1)});
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  auto t = at::zeros({x2.size(0), lora_a.size(1)}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  for (size_t a = 0; a + 1 < seg.offsets.size(); ++a) {
    const int64_t count = seg.offsets[a + 1] - seg.offsets[a];
    if (count == 0) continue;
    const auto rows = rows_all.narrow(0, seg.offsets[a], count);
    const auto ts = at::mm(x2.index_select(0, rows), lora_a[a].t());
    y.index_add_(0, rows, at::mm(ts, lora_b[a].t()), seg.scales[a]);
    t.index_copy_(0, rows, ts.to(t.scalar_type()));
  }
  return {y.view(out_shape), t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scales, const at::Tensor& adapter_index, const at::Tensor& t,
    std::array<bool, 4> output_mask) {
  const auto [need_x, need_a, need_b, need_bias] = output_mask;
  c10::cuda::CUDAGuard guard(x.device());
  const auto seg = make_segments(adapter_index, scales);
  const auto rows_all = seg.rows.to(x.device());
  const auto x2 = x.reshape({-1, x.size(-1)}), dy = grad_out.reshape({-1, grad_out.size(-1)});
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = need_x ? at::mm(dy, weight) : empty();
  at::Tensor da = need_a ? at::zeros_like(lora_a) : empty(), db = need_b ? at::zeros_like(lora_b) : empty();
  for (size_t a = 0; a + 1 < seg.offsets.size(); ++a) {
    const int64_t count = seg.offsets[a + 1] - seg.offsets[a];
    if (count == 0) continue;
    const auto rows = rows_all.narrow(0, seg.offsets[a], count);
    const auto dys = dy.index_select(0, rows);
    auto u = at::mm(dys, lora_b[a]).mul_(seg.scales[a]);
    if (need_b) db[a].copy_(at::mm(dys.t(), t.index_select(0, rows).to(x.scalar_type())).mul_(seg.scales[a]));
    if (need_a) da[a].copy_(at::mm(u.t(), x2.index_select(0, rows)));
    if (need_x) dx.index_add_(0, rows, at::mm(u, lora_a[a]));
  }
  return {need_x ? dx.view(x.sizes()) : dx, da, db, need_bias ? dy.sum(0) : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CUDA, m) {
  m.impl("multi_lora_linear_forward", &multi_lora_linear_forward_cuda);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cuda);
}

}  // namespace peftops::multi_lora
