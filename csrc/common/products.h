#pragma once
// out += alpha * (p q) by the vendor GEMM, in place. With alpha = 0, BLAS skips the product and would hide a NaN or
// inf in p or q that peft's (p q) * scale keeps; that case multiplies the product out instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

namespace peftops {

inline void add_scaled_product(at::Tensor& out, const at::Tensor& p, const at::Tensor& q, double alpha) {
  if (alpha != 0.0) {
    out.addmm_(p, q, 1.0, alpha);
  } else {
    out.add_(at::mm(p, q).mul_(0.0));
  }
}

}  // namespace peftops
