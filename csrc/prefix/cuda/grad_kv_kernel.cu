// prefix_attention's backward kernel for dk, dv and the prefix's partials (see prefix_attention_kernel.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tiles.cuh"

namespace peftops::prefix::cuda {
namespace {

// Backward, per key of [prefix | sequence]: dv_j = sum keep p dO and dk_j = scale sum ds q over the query rows (of
// the G query heads of kv head h) that see key j, ds = p (keep dO . v_j - delta), keep the attention dropout's scale
// (1 without). Sequence keys go to dk, dv; prefix keys to per-batch-row partials [B, Hkv, P, D] in acc_t. Grid (key
// blocks, Hkv, B).
template <typename scalar_t, int kD>
__global__ void __launch_bounds__(kThreads)
    grad_kv_kernel(Operands<scalar_t> a, Strided<const scalar_t> dout, const at::opmath_type<scalar_t>* lse,
                   const at::opmath_type<scalar_t>* delta, Strided<scalar_t> dk, Strided<scalar_t> dv,
                   at::opmath_type<scalar_t>* dpk, at::opmath_type<scalar_t>* dpv) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kT = kTile<kD>;
  __shared__ acc_t qs[kT * kD], dos[kT * kD], lse_s[kT], delta_s[kT];
  const int64_t b = blockIdx.z, h = blockIdx.y, L = a.vis.L, keys = a.P + a.vis.S;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kThreads, j = j0 + threadIdx.x;
  const bool active = j < keys;
  const acc_t scale = static_cast<acc_t>(a.scale), inf = std::numeric_limits<acc_t>::infinity();
  const int64_t jr = active ? j : 0;  // an idle thread reads key 0 and writes nothing
  acc_t kr[kD], vr[kD], gk[kD], gv[kD];
  load_row(kr, a.D, [&](int d) { return key_at(a.pk, a.k, a.P, b, h, jr, d); });
  load_row(vr, a.D, [&](int d) { return key_at(a.pv, a.v, a.P, b, h, jr, d); });
#pragma unroll
  for (int d = 0; d < kD; ++d) gk[d] = gv[d] = 0;
  // the block's first key decides the first query row that any of its keys is visible to
  const int64_t first = j0 < a.P ? 0 : a.vis.first_row(j0 - a.P);
  for (int64_t hq = h * a.G; hq < (h + 1) * a.G; ++hq) {
    const int64_t base = (b * a.G * a.Hkv + hq) * L;
    for (int64_t r0 = first; r0 < L; r0 += kT) {
      const int n = static_cast<int>(smaller(kT, L - r0));
      __syncthreads();
      stage<kD>(qs, n, a.D, [&](int i, int d) { return a.q.at(b, hq, r0 + i, d); });
      stage<kD>(dos, n, a.D, [&](int i, int d) { return dout.at(b, hq, r0 + i, d); });
      if (threadIdx.x < n) {
        lse_s[threadIdx.x] = lse[base + r0 + threadIdx.x];
        delta_s[threadIdx.x] = delta[base + r0 + threadIdx.x];
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll 1
      for (int i = 0; i < n; ++i) {
        if (j >= a.P && !a.vis.sees(b, r0 + i, j - a.P)) continue;
        const acc_t row_lse = lse_s[i];
        const bool finite = row_lse > -inf && row_lse < inf;
        const acc_t p = finite ? exp_of(dot(kr, qs + i * kD) * scale - row_lse) : nan_of<acc_t>();
        if (p == acc_t(0)) continue;
        const acc_t keep = keep_of(a, b, hq, r0 + i, j);
        axpy(gv, p * keep, dos + i * kD);
        axpy(gk, p * (keep * dot(vr, dos + i * kD) - delta_s[i]) * scale, qs + i * kD);
      }
    }
  }
  if (!active) return;
  if (j < a.P) {
    const int64_t at = ((b * a.Hkv + h) * a.P + j) * a.D;
    store_row(dpk + at, 1, a.D, gk);
    store_row(dpv + at, 1, a.D, gv);
  } else {
    store_row(dk.row(b, h, j - a.P), dk.d, a.D, gk);
    store_row(dv.row(b, h, j - a.P), dv.d, a.D, gv);
  }
}

}  // namespace

template <typename scalar_t, int kD>
void launch_grad_kv(dim3 grid, cudaStream_t stream, const Operands<scalar_t>& a, Strided<const scalar_t> dout,
                    const acc_of<scalar_t>* lse, const acc_of<scalar_t>* delta, Strided<scalar_t> dk,
                    Strided<scalar_t> dv, acc_of<scalar_t>* dpk, acc_of<scalar_t>* dpv) {
  grad_kv_kernel<scalar_t, kD><<<grid, kThreads, 0, stream>>>(a, dout, lse, delta, dk, dv, dpk, dpv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define PEFTOPS_INSTANTIATE(T, D) \
  template void launch_grad_kv<T, D>(dim3, cudaStream_t, const Operands<T>&, Strided<const T>, const acc_of<T>*, \
                                            const acc_of<T>*, Strided<T>, Strided<T>, acc_of<T>*, acc_of<T>*);
PEFTOPS_PREFIX_FOR_EACH(PEFTOPS_INSTANTIATE)

}  // namespace peftops::prefix::cuda
