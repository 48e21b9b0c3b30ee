#pragma once
// Products with a scale alpha applied inside the vendor GEMM, in its accumulation type: a 16-bit p q that would
// overflow before a small alpha does not (peft scales dy before its product). With alpha = 0, BLAS skips the product
// and would hide a NaN or inf in p or q that PyTorch keeps: the forward's (p q) * 0 then multiplies the product out,
// and the backward's (0 p) q, where autograd zeroes dy first, zeroes an operand (a NaN or inf stays, an overflow of
// p q does not).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

namespace peftops {

// out += alpha * (p q), in place.
inline void add_scaled_product(at::Tensor& out, const at::Tensor& p, const at::Tensor& q, double alpha) {
  if (alpha != 0.0) {
    out.addmm_(p, q, 1.0, alpha);
  } else {
    out.add_(at::mm(p, q).mul_(0.0));
  }
}

// alpha * (p q) as a new matrix, for backward: p or q is dy, which autograd scales first.
inline at::Tensor scaled_product(const at::Tensor& p, const at::Tensor& q, double alpha) {
  if (alpha == 0.0) return p.numel() <= q.numel() ? at::mm(p.mul(0.0), q) : at::mm(p, q.mul(0.0));
  auto out = at::empty({p.size(0), q.size(1)}, p.options());
  return out.addmm_(p, q, /*beta=*/0.0, alpha);  // beta = 0: the uninitialised out is never read
}

}  // namespace peftops
