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
  for_each_visible_key<kD>(a, b, h, l0, l, [&](int64_t j, const acc_t* k_j, const acc_t* v_j) {
    const acc_t z = dot(qr, k_j) * scale;
    if (z != z) nan = true;
    if (z != z || z == -inf) return;  // weight 0 (a NaN row is made NaN at the end)
    if (z > m) {  // a new maximum rescales what came before (by 0 while m = -inf)
      const acc_t c = exp_of(m - z);
      sum *= c;
#pragma unroll
      for (int d = 0; d < kD; ++d) o[d] *= c;
      m = z;
    }
    const acc_t p = exp_of(z - m);
    sum += p;  // the normaliser of the undropped probabilities; the output takes the dropped ones
    axpy(o, p * keep_of(a, b, hq, l, j), v_j);
  });
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
