// IA3 on the CPU (KERNELS.md, "IA3"): the vendor GEMM for the product, the scaling fused into one vectorised
// pass over its input or output, and every vector gradient reduced in a single pass over the rows. The output
// scaling's gradient needs the base output: kept by autograd where it is no bigger than x, else recomputed here.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../../common/cpu/row_pass.h"
#include "../ia3_linear.h"

namespace peftops::ia3 {
namespace {

at::Tensor rows(const at::Tensor& t) { return cpu::unit_column_stride(t.reshape({-1, t.size(-1)})); }

at::Tensor base_product(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

// dst[n, :] = src[n, :] o l for every row (dst may be src: in place).
template <typename scalar_t>
void scale_rows(const at::Tensor& src, at::Tensor& dst, const std::vector<at::opmath_type<scalar_t>>& l) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = src.size(0), K = src.size(1);
  const scalar_t* sp = src.const_data_ptr<scalar_t>();
  scalar_t* dp = dst.data_ptr<scalar_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(K);
    for (int64_t n = begin; n < end; ++n) {
      at::vec::convert(sp + n * src.stride(0), row.data(), K);
      for (int64_t k = 0; k < K; ++k) row[k] *= l[k];
      at::vec::convert(row.data(), dp + n * dst.stride(0), K);
    }
  });
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> as_vector(const at::Tensor& t) {
  std::vector<at::opmath_type<scalar_t>> v(t.numel());
  at::vec::convert(t.contiguous().const_data_ptr<scalar_t>(), v.data(), t.numel());
  return v;
}

at::Tensor ia3_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& scale, bool feedforward) {
  check_inputs(x, weight, bias, scale, feedforward);
  const auto x2 = rows(x);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ia3_linear_forward_cpu", [&] {
    const auto l = as_vector<scalar_t>(scale);
    if (feedforward) {  // (x o l) W^T + b: the scaled input is transient
      auto xs = at::empty(x2.sizes(), x2.options());
      scale_rows<scalar_t>(x2, xs, l);
      y = base_product(xs, weight, bias);
    } else {  // (x W^T + b) o l, scaled in place
      y = base_product(x2, weight, bias);
      scale_rows<scalar_t>(y, y, l);
    }
  });
  return y.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ia3_linear_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& base,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& scale, bool feedforward,
    std::array<bool, 3> output_mask) {
  const auto [need_x, need_bias, need_scale] = output_mask;
  const auto dy = rows(grad_out);
  const int64_t N = dy.size(0), in = weight.size(1), out = weight.size(0);
  auto x_shape = grad_out.sizes().vec();
  x_shape.back() = in;
  const auto x2 = [&] {
    TORCH_CHECK(x.has_value() && x->defined(), "ia3_linear_backward: x is needed");
    return rows(*x);
  };
  const auto dtype = grad_out.scalar_type();
  const auto empty = [&] { return at::empty({0}, grad_out.options()); };
  at::Tensor dx = empty(), db = empty(), dl = empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ia3_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto l = as_vector<scalar_t>(scale);
    const auto acc_opts = grad_out.options().dtype(at::toOpMathType(dtype));
    if (feedforward) {
      // g = dy W; one pass over g and x: dx = g o l (in place in g), dl = sum_rows(g o x).
      if (need_x || need_scale) {
        auto g = at::mm(dy, weight);
        auto sums = at::empty({in}, acc_opts);
        const auto xr2 = need_scale ? x2() : at::Tensor();
        const scalar_t* xp = need_scale ? xr2.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* gp = g.data_ptr<scalar_t>();
        cpu::rows_reducing<acc_t>(N, in, need_scale ? in : 0, sums.data_ptr<acc_t>(), [&](int64_t n, acc_t* part) {
          thread_local std::vector<acc_t> gr, xr;
          gr.resize(in), xr.resize(in);
          at::vec::convert(gp + n * in, gr.data(), in);
          if (need_scale) {
            at::vec::convert(xp + n * xr2.stride(0), xr.data(), in);
            for (int64_t k = 0; k < in; ++k) part[k] += gr[k] * xr[k];
          }
          if (need_x) {
            for (int64_t k = 0; k < in; ++k) gr[k] *= l[k];
            at::vec::convert(gr.data(), gp + n * in, in);
          }
        });
        if (need_x) dx = g.view(x_shape);
        if (need_scale) dl = sums.to(scale.scalar_type());
      }
      if (need_bias) db = dy.sum(0, false, acc_opts.dtype().toScalarType()).to(dtype);
    } else {
      // One pass over dy (and the recomputed base output): dy o l for dx, sum_rows(dy o base) for dl,
      // sum_rows(dy) o l for the bias.
      const auto z = !need_scale ? at::Tensor()
                     : base.has_value() && base->defined() ? base->reshape({-1, out}).contiguous()
                                                           : base_product(x2(), weight, bias);
      auto gs = need_x ? at::empty({N, out}, dy.options()) : at::Tensor();
      const int64_t width = (need_scale ? out : 0) + (need_bias ? out : 0);
      auto sums = at::empty({width}, acc_opts);
      const scalar_t* gp = dy.const_data_ptr<scalar_t>();
      const scalar_t* bp = need_scale ? z.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* sp = need_x ? gs.data_ptr<scalar_t>() : nullptr;
      cpu::rows_reducing<acc_t>(N, out, width, sums.data_ptr<acc_t>(), [&](int64_t n, acc_t* part) {
        thread_local std::vector<acc_t> gr, br;
        gr.resize(out), br.resize(out);
        at::vec::convert(gp + n * dy.stride(0), gr.data(), out);
        if (need_scale) {
          at::vec::convert(bp + n * out, br.data(), out);
          for (int64_t k = 0; k < out; ++k) part[k] += gr[k] * br[k];
        }
        if (need_bias) {
          acc_t* pb = part + (need_scale ? out : 0);
          for (int64_t k = 0; k < out; ++k) pb[k] += gr[k];
        }
        if (need_x) {
          for (int64_t k = 0; k < out; ++k) gr[k] *= l[k];
          at::vec::convert(gr.data(), sp + n * out, out);
        }
      });
      if (need_x) dx = at::mm(gs, weight).view(x_shape);
      if (need_scale) dl = sums.narrow(0, 0, out).to(scale.scalar_type());
      if (need_bias) {
        auto lt = at::empty({out}, acc_opts);
        std::copy(l.begin(), l.end(), lt.data_ptr<acc_t>());
        db = sums.narrow(0, need_scale ? out : 0, out).mul(lt).to(dtype);
      }
    }
  });
  return {dx, db, dl};
}

// ia3_glu_linear's backward (KERNELS.md algebra in ia3_glu_linear.cpp): after the GEMM g = dy W, one pass over the
// rows of g, gate and up yields dl = sum_rows(g o gate o up), d_gate = g o l o up and d_up = g o l o gate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ia3_glu_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& weight,
    const at::Tensor& scale, std::array<bool, 4> output_mask) {
  const auto [need_gate, need_up, need_bias, need_scale] = output_mask;
  const auto dy = rows(grad_out), a2 = rows(gate), b2 = rows(up);
  const int64_t N = dy.size(0), in = weight.size(1);
  const auto dtype = gate.scalar_type();
  const auto empty = [&] { return at::empty({0}, gate.options()); };
  at::Tensor da = empty(), db = empty(), dbias = empty(), dl = empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ia3_glu_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = gate.options().dtype(at::toOpMathType(dtype));
    if (need_gate || need_up || need_scale) {
      const auto g = at::mm(dy, weight);
      const auto l = as_vector<scalar_t>(scale);
      if (need_gate) da = at::empty({N, in}, gate.options());
      if (need_up) db = at::empty({N, in}, gate.options());
      auto sums = at::empty({in}, acc_opts);
      const scalar_t *gp = g.const_data_ptr<scalar_t>(), *ap = a2.const_data_ptr<scalar_t>(),
                     *bp = b2.const_data_ptr<scalar_t>();
      scalar_t* dap = need_gate ? da.data_ptr<scalar_t>() : nullptr;
      scalar_t* dbp = need_up ? db.data_ptr<scalar_t>() : nullptr;
      cpu::rows_reducing<acc_t>(N, in, need_scale ? in : 0, sums.data_ptr<acc_t>(), [&](int64_t n, acc_t* part) {
        thread_local std::vector<acc_t> gr, ar, br, out;
        gr.resize(in), ar.resize(in), br.resize(in), out.resize(in);
        at::vec::convert(gp + n * in, gr.data(), in);
        at::vec::convert(ap + n * a2.stride(0), ar.data(), in);
        at::vec::convert(bp + n * b2.stride(0), br.data(), in);
        if (need_scale) {
          for (int64_t k = 0; k < in; ++k) part[k] += gr[k] * (ar[k] * br[k]);
        }
        for (int64_t k = 0; k < in; ++k) gr[k] *= l[k];
        if (need_gate) {
          for (int64_t k = 0; k < in; ++k) out[k] = gr[k] * br[k];
          at::vec::convert(out.data(), dap + n * in, in);
        }
        if (need_up) {
          for (int64_t k = 0; k < in; ++k) out[k] = gr[k] * ar[k];
          at::vec::convert(out.data(), dbp + n * in, in);
        }
      });
      if (need_gate) da = da.view(gate.sizes());
      if (need_up) db = db.view(up.sizes());
      if (need_scale) dl = sums.to(scale.scalar_type());
    }
    if (need_bias) dbias = dy.sum(0, false, acc_opts.dtype().toScalarType()).to(dtype);
  });
  return {da, db, dbias, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftops, CPU, m) {
  m.impl("ia3_linear_forward", &ia3_linear_forward_cpu);
  m.impl("ia3_linear_backward", &ia3_linear_backward_cpu);
  m.impl("ia3_glu_linear_backward", &ia3_glu_linear_backward_cpu);
}

}  // namespace peftops::ia3
