// prefix_attention's backward kernel for dq (see prefix_attention_kernel.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tiles.cuh"

namespace peftops::prefix::cuda {
namespace {

// Backward, per query row: dq = scale sum_j ds_j k_j with ds_j = p_j (dO . v_j - delta), delta = dO . O (written out
// for the key kernel). Grid (row blocks, Hq, B).
template <typename scalar_t, int kD>
__global__ void __launch_bounds__(kThreads)
    grad_q_kernel(Operands<scalar_t> a, Strided<const scalar_t> dout, Strided<const scalar_t> out,
                  const at::opmath_type<scalar_t>* lse, Strided<scalar_t> dq, at::opmath_type<scalar_t>* delta) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kT = kTile<kD>;
  __shared__ acc_t ks[kT * kD], vs[kT * kD];
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
  const int64_t reach = a.P + a.vis.end(smaller(L, l0 + kThreads) - 1);
  for (int64_t t0 = 0; t0 < reach; t0 += kT) {
    const int n = static_cast<int>(smaller(kT, reach - t0));
    __syncthreads();
    stage<kD>(ks, n, a.D, [&](int i, int d) { return key_at(a.pk, a.k, a.P, b, h, t0 + i, d); });
    stage<kD>(vs, n, a.D, [&](int i, int d) { return key_at(a.pv, a.v, a.P, b, h, t0 + i, d); });
    __syncthreads();
    if (!active) continue;
#pragma unroll 1
    for (int i = 0; i < n; ++i) {
      const int64_t j = t0 + i;
      if (j >= a.P && !a.vis.sees(b, l, j - a.P)) continue;
      const acc_t p = finite ? exp_of(dot(qr, ks + i * kD) * scale - row_lse) : nan_of<acc_t>();
      if (p == acc_t(0)) continue;  // a key whose p underflows adds nothing (nor a NaN from its value)
      axpy(g, p * (dot(dor, vs + i * kD) - dlt) * scale, ks + i * kD);
    }
  }
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
