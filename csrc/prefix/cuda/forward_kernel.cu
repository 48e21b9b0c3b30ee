// prefix_attention's forward kernel (see prefix_attention_kernel.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tiles.cuh"

namespace peftops::prefix::cuda {
namespace {

// out [B, Hq, L, D] (any strides) and lse [B, Hq, L] (contiguous, acc_t): grid (row blocks, Hq, B).
template <typename scalar_t, int kD>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Operands<scalar_t> a, Strided<scalar_t> out, at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kT = kTile<kD>;
  __shared__ acc_t ks[kT * kD], vs[kT * kD];
  const int64_t b = blockIdx.z, hq = blockIdx.y, h = hq / a.G, L = a.vis.L;
  const int64_t l0 = static_cast<int64_t>(blockIdx.x) * kThreads, l = l0 + threadIdx.x;
  const bool active = l < L;
  const acc_t scale = static_cast<acc_t>(a.scale), inf = std::numeric_limits<acc_t>::infinity();
  acc_t qr[kD], o[kD];
  load_row(qr, a.D, [&](int d) { return a.q.at(b, hq, active ? l : 0, d); });
#pragma unroll
  for (int d = 0; d < kD; ++d) o[d] = 0;
  acc_t m = -inf, sum = 0;
  bool nan = false;  // a visible NaN score makes the row NaN, as softmax does
  const int64_t reach = a.P + a.vis.end(smaller(L, l0 + kThreads) - 1);  // the block's last visible key, plus one
  for (int64_t t0 = 0; t0 < reach; t0 += kT) {
    const int n = static_cast<int>(smaller(kT, reach - t0));
    __syncthreads();  // the previous tile is consumed
    stage<kD>(ks, n, a.D, [&](int i, int d) { return key_at(a.pk, a.k, a.P, b, h, t0 + i, d); });
    stage<kD>(vs, n, a.D, [&](int i, int d) { return key_at(a.pv, a.v, a.P, b, h, t0 + i, d); });
    __syncthreads();
    if (!active) continue;
#pragma unroll 1
    for (int i = 0; i < n; ++i) {  // one key at a time: the code stays small (fast to compile) and in registers
      const int64_t j = t0 + i;
      if (j >= a.P && !a.vis.sees(b, l, j - a.P)) continue;
      const acc_t z = dot(qr, ks + i * kD) * scale;
      if (z != z) nan = true;
      if (z != z || z == -inf) continue;  // weight 0 (a NaN row is made NaN at the end)
      if (z > m) {  // a new maximum rescales what came before (by 0 while m = -inf)
        const acc_t c = exp_of(m - z);
        sum *= c;
#pragma unroll
        for (int d = 0; d < kD; ++d) o[d] *= c;
        m = z;
      }
      const acc_t p = exp_of(z - m);
      sum += p;
      axpy(o, p, vs + i * kD);
    }
  }
  if (!active) return;
  const bool finite = !nan && m > -inf && m < inf;
  const acc_t inv = finite ? acc_t(1) / sum : nan_of<acc_t>();
#pragma unroll
  for (int d = 0; d < kD; ++d) o[d] *= inv;
  store_row(out.row(b, hq, l), out.d, a.D, o);
  lse[(b * a.G * a.Hkv + hq) * L + l] = finite ? m + log_of(sum) : nan_of<acc_t>();
}

}  // namespace

template <typename scalar_t, int kD>
void launch_forward(dim3 grid, cudaStream_t stream, const Operands<scalar_t>& a, Strided<scalar_t> out,
                    acc_of<scalar_t>* lse) {
  forward_kernel<scalar_t, kD><<<grid, kThreads, 0, stream>>>(a, out, lse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define PEFTOPS_INSTANTIATE(T, D) \
  template void launch_forward<T, D>(dim3, cudaStream_t, const Operands<T>&, Strided<T>, acc_of<T>*);
PEFTOPS_PREFIX_FOR_EACH(PEFTOPS_INSTANTIATE)

}  // namespace peftops::prefix::cuda
