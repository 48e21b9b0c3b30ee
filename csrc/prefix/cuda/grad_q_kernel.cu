// prefix_attention's backward kernel for dq (see prefix_attention_kernel.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tiles.cuh"

namespace peftops::prefix::cuda {
namespace {

// Backward, per query row: dq = scale sum_j ds_j k_j with ds_j = p_j (keep_j dO . v_j - delta), delta = dO . O
// (written out for the key kernel), keep_j the attention dropout's scale (1 without). Grid (row blocks, Hq, B).
template <typename scalar_t, int kD>
__global__ void __launch_bounds__(kThreads)
    grad_q_kernel(Operands<scalar_t> a, Strided<const scalar_t> dout, Strided<const scalar_t> out,
                  const at::opmath_type<scalar_t>* lse, Strided<scalar_t> dq, at::opmath_type<scalar_t>* delta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.z, hq = blockIdx.y, h = hq / a.G, L = a.vis.L;
  const int64_t l0 = static_cast<int64_t>(blockIdx.x) * kThreads, l = l0 + threadIdx.x;
  const bool active = l < L;
  const acc_t scale = static_cast<acc_t>(a.scale), inf = std::numeric_limits<acc_t>::infinity();
  const int64_t r = active ? l : 0, at_row = (b * a.G * a.Hkv + hq) * L + r;
  acc_t qr[kD], dor[kD], g[kD];
  load_row(qr, a.D, [&](int d) { return a.q.at(b, hq, r, d); });
  load_row(dor, a.D, [&](int d) { return dout.at(b, hq, r, d); });
  load_row(g, a.D, [&](int d) { return out.at(b, hq, r, d); });
  const acc_t dlt = dot(dor, g), row_lse = lse[at_row];
  const bool finite = row_lse > -inf && row_lse < inf;  // else every p is NaN, as the forward's row was
#pragma unroll
  for (int d = 0; d < kD; ++d) g[d] = 0;
  for_each_visible_key<kD>(a, b, h, l0, l, [&](int64_t j, const acc_t* k_j, const acc_t* v_j) {
    const acc_t p = finite ? exp_of(dot(qr, k_j) * scale - row_lse) : nan_of<acc_t>();
    if (p == acc_t(0)) return;  // a key whose p underflows adds nothing (nor a NaN from its value)
    axpy(g, p * (keep_of(a, b, hq, l, j) * dot(dor, v_j) - dlt) * scale, k_j);
  });
  if (!active) return;
  delta[at_row] = dlt;
  store_row(dq.row(b, hq, l), dq.d, a.D, g);
}

}  // namespace

template <typename scalar_t, int kD>
void launch_grad_q(dim3 grid, cudaStream_t stream, const Operands<scalar_t>& a, Strided<const scalar_t> dout,
                   Strided<const scalar_t> out, const acc_of<scalar_t>* lse, Strided<scalar_t> dq,
                   acc_of<scalar_t>* delta) {
  grad_q_kernel<scalar_t, kD><<<grid, kThreads, 0, stream>>>(a, dout, out, lse, dq, delta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define PEFTOPS_INSTANTIATE(T, D) \
  template void launch_grad_q<T, D>(dim3, cudaStream_t, const Operands<T>&, Strided<const T>, Strided<const T>, \
                                           const acc_of<T>*, Strided<T>, acc_of<T>*);
PEFTOPS_PREFIX_FOR_EACH(PEFTOPS_INSTANTIATE)

}  // namespace peftops::prefix::cuda
