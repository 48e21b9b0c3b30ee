// Many LoRA adapters in one batch on the CPU: the base product once by the vendor GEMM, then per adapter
// segment the LoRA row passes of common/cpu/row_pass.h visit that segment's rows in place (no gather, no
// scatter): shrink to rank r, expand into the output; backward the same per segment.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../../common/cpu/row_pass.h"
#include "../multi_lora_linear.h"

namespace peftops::multi_lora {
namespace {

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scales, const at::Tensor& adapter_index) {
  check_inputs(x, weight, bias, lora_a, lora_b, scales, adapter_index);
  const auto seg = make_segments(adapter_index, scales);
  const auto x2 = cpu::unit_column_stride(x.reshape({-1, x.size(-1)}));
  const int64_t tokens = x2.size(0), in = weight.size(1), out = weight.size(0), r = lora_a.size(1);
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;
  auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multi_lora_linear_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rp = cpu::padded_rank<acc_t>(r);
    auto t_all = at::zeros({tokens, rp}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    for (size_t a = 0; a + 1 < seg.offsets.size(); ++a) {
      const int64_t count = seg.offsets[a + 1] - seg.offsets[a];
      if (count == 0) continue;  // an empty segment costs nothing
      const int64_t* rows = seg.rows.const_data_ptr<int64_t>() + seg.offsets[a];
      const auto a_t = cpu::padded(lora_a[a].t(), 1, rp);  // [in, rp]
      const auto b_t = cpu::padded(lora_b[a].t(), 0, rp);  // [rp, out]
      cpu::RowPass<scalar_t> down;  // t = x A_a^T on the segment's rows
      down.N = count, down.K = in, down.rp = rp, down.row_ids = rows;
      down.x = x2.const_data_ptr<scalar_t>(), down.ldx = x2.stride(0);
      down.m = a_t.const_data_ptr<acc_t>(), down.rowout = t_all.data_ptr<acc_t>();
      down.run();
      cpu::RowPass<scalar_t> up;  // y += s_a t B_a^T in place on the same rows
      up.N = count, up.K = out, up.rp = rp, up.row_ids = rows;
      up.y = y.data_ptr<scalar_t>(), up.ldy = y.stride(0);
      up.ev = t_all.const_data_ptr<acc_t>(), up.e = b_t.const_data_ptr<acc_t>();
      up.alpha = static_cast<acc_t>(seg.scales[a]);
      up.run();
    }
    t = rp == r ? t_all : t_all.narrow(1, 0, r).contiguous();
  });
  return {y.view(out_shape), t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scales, const at::Tensor& adapter_index, const at::Tensor& t,
    std::array<bool, 4> output_mask) {
  const auto [need_x, need_a, need_b, need_bias] = output_mask;
  const auto seg = make_segments(adapter_index, scales);
  const auto x2 = cpu::unit_column_stride(x.reshape({-1, x.size(-1)}));
  const auto dy = cpu::unit_column_stride(grad_out.reshape({-1, grad_out.size(-1)}));
  const int64_t tokens = x2.size(0), in = weight.size(1), out = weight.size(0), r = lora_a.size(1);
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = need_x ? at::mm(dy, weight) : empty(), da = empty(), db = empty(), dbias = empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multi_lora_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rp = cpu::padded_rank<acc_t>(r);
    const auto acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
    const auto t_pad = cpu::padded(t, 1, rp);
    auto u = at::empty({tokens, rp}, acc_opts);
    auto da_all = at::zeros({lora_a.size(0), r, in}, acc_opts), db_all = at::zeros({lora_a.size(0), out, r}, acc_opts);
    auto da_t = at::empty({in, rp}, acc_opts), db_t = at::empty({out, rp}, acc_opts);
    for (size_t a = 0; a + 1 < seg.offsets.size(); ++a) {
      const int64_t count = seg.offsets[a + 1] - seg.offsets[a];
      if (count == 0) continue;
      const int64_t* rows = seg.rows.const_data_ptr<int64_t>() + seg.offsets[a];
      const double s = seg.scales[a];
      const auto b_s = cpu::padded(lora_b[a].mul(s), 1, rp);  // [out, rp]: the scale folded in, so u = s dy B
      const auto a_pad = cpu::padded(lora_a[a], 0, rp);    // [rp, in]
      cpu::RowPass<scalar_t> over_dy;  // u = s dy B and dB^T = dy^T t on the segment's rows
      over_dy.N = count, over_dy.K = out, over_dy.rp = rp, over_dy.row_ids = rows;
      over_dy.x = dy.const_data_ptr<scalar_t>(), over_dy.ldx = dy.stride(0);
      over_dy.m = b_s.const_data_ptr<acc_t>(), over_dy.rowout = u.data_ptr<acc_t>();
      over_dy.v = t_pad.const_data_ptr<acc_t>(), over_dy.colacc = need_b ? db_t.data_ptr<acc_t>() : nullptr;
      over_dy.run();
      cpu::RowPass<scalar_t> over_x;  // dA^T = x^T u and dx += u A on the same rows
      over_x.N = count, over_x.K = in, over_x.rp = rp, over_x.row_ids = rows;
      if (need_a) {
        over_x.x = x2.const_data_ptr<scalar_t>(), over_x.ldx = x2.stride(0);
        over_x.v = u.const_data_ptr<acc_t>(), over_x.colacc = da_t.data_ptr<acc_t>();
      }
      if (need_x) {
        over_x.y = dx.data_ptr<scalar_t>(), over_x.ldy = dx.stride(0);
        over_x.ev = u.const_data_ptr<acc_t>(), over_x.e = a_pad.const_data_ptr<acc_t>();
      }
      if (need_a || need_x) over_x.run();
      if (need_a) da_all[a].copy_(da_t.narrow(1, 0, r).t());
      if (need_b) db_all[a].copy_(db_t.narrow(1, 0, r).mul(s));
    }
    if (need_a) da = da_all.to(lora_a.scalar_type());
    if (need_b) db = db_all.to(lora_b.scalar_type());
    if (need_bias) dbias = dy.sum(0, false, acc_opts.dtype().toScalarType()).to(x.scalar_type());
  });
  return {need_x ? dx.view(x.sizes()) : dx, da, db, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("multi_lora_linear_forward", &multi_lora_linear_forward_cpu);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cpu);
}

}  // namespace peftops::multi_lora
