// The CUDA prefix kernels' shared pieces (prefix_attention_kernel.cu says how they work): the strided operands, the
// per-thread row helpers and the tile staging, and the launchers that the host code calls. Each kernel is compiled in
// its own file (forward_kernel.cu, grad_q_kernel.cu, grad_kv_kernel.cu), so that the three build in parallel.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../../common/philox.h"
#include "../visible.h"

namespace peftops::prefix::cuda {

constexpr int kThreads = 64;  // query rows (or keys) per block, one per thread

// Rows staged per shared-memory tile: 8 KiB per staged tensor, two per kernel.
template <int kD>
constexpr int kTile = kD >= 256 ? 8 : 2048 / kD;

// A [B, H, rows, D] tensor read or written through its strides (elements). A prefix shared by the batch has b = 0.
template <typename T>
struct Strided {
  T* data;
  int64_t b, h, r, d;
  __device__ T* row(int64_t bi, int64_t hi, int64_t ri) const { return data + bi * b + hi * h + ri * r; }
  __device__ T& at(int64_t bi, int64_t hi, int64_t ri, int64_t di) const { return row(bi, hi, ri)[di * d]; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t, T* data) {
  if (t.dim() == 3) return {data, 0, t.stride(0), t.stride(1), t.stride(2)};
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
struct Operands {
  Strided<const scalar_t> q, k, v, pk, pv;
  Visible vis;
  int64_t Hkv, G, P, D;
  double scale;
  // attention dropout (prefix_attention.h): the seed on the device (null: none), and its threshold and keep scale
  const int64_t* seed;
  uint32_t threshold;
  double keep_scale;
};

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }

__device__ __forceinline__ int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename acc_t>
__device__ __forceinline__ acc_t nan_of() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// A row of D elements, element d = at(d), into registers, zero-padded to kD.
template <int kD, typename acc_t, typename At>
__device__ __forceinline__ void load_row(acc_t (&dst)[kD], int64_t D, At at) {
#pragma unroll
  for (int d = 0; d < kD; ++d) dst[d] = d < D ? static_cast<acc_t>(at(d)) : acc_t(0);
}

// Its first D elements out (unrolled over kD: a register array indexed at run time would live in local memory).
template <int kD, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* dst, int64_t stride, int64_t D, const acc_t (&src)[kD]) {
#pragma unroll
  for (int d = 0; d < kD; ++d) {
    if (d < D) dst[d * stride] = static_cast<scalar_t>(src[d]);
  }
}

template <int kD, typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t (&a)[kD], const acc_t* b) {
  acc_t s = 0;
#pragma unroll
  for (int d = 0; d < kD; ++d) s += a[d] * b[d];
  return s;
}

template <int kD, typename acc_t>
__device__ __forceinline__ void axpy(acc_t (&y)[kD], acc_t a, const acc_t* x) {
#pragma unroll
  for (int d = 0; d < kD; ++d) y[d] += a * x[d];
}

// The block's threads stage n rows into dst [kTile, kD], element d of row i = at(i, d), zero-padded.
template <int kD, typename acc_t, typename At>
__device__ __forceinline__ void stage(acc_t* dst, int n, int64_t D, At at) {
  for (int e = threadIdx.x; e < n * kD; e += blockDim.x) {
    const int i = e / kD, d = e % kD;
    dst[e] = d < D ? static_cast<acc_t>(at(i, d)) : acc_t(0);
  }
}

// The attention dropout's scale of key j of [prefix | sequence] for query row l of query head hq: 1 without dropout,
// else 0 or 1 / (1 - p), by the Philox of element (b, hq, l, j) of [B, Hq, L, P + S], as on the CPU.
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> keep_of(const Operands<scalar_t>& a, int64_t b, int64_t hq,
                                                             int64_t l, int64_t j) {
  using acc_t = at::opmath_type<scalar_t>;
  if (a.seed == nullptr) return acc_t(1);
  Dropout d;
  d.seed = static_cast<uint64_t>(*a.seed);
  d.threshold = a.threshold;
  const uint64_t row = static_cast<uint64_t>((b * a.G * a.Hkv + hq) * a.vis.L + l);
  const uint64_t index = row * static_cast<uint64_t>(a.P + a.vis.S) + static_cast<uint64_t>(j);
  return d.keep(index) ? static_cast<acc_t>(a.keep_scale) : acc_t(0);
}

// Element d of key j of batch row b and kv head h in [prefix | sequence], each read through its own strides.
template <typename scalar_t>
__device__ __forceinline__ scalar_t key_at(const Strided<const scalar_t>& prefix, const Strided<const scalar_t>& seq,
                                           int64_t P, int64_t b, int64_t h, int64_t j, int64_t d) {
  return j < P ? prefix.at(b, h, j, d) : seq.at(b, h, j - P, d);
}

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

// The query-row kernels' walk over the keys (forward and dq): the block stages, tile by tile, the keys
// [prefix | sequence] that its rows [l0, l0 + kThreads) reach, and the thread of row l (if l < L) visits those its row
// sees, visit(j, k_j, v_j) on the staged rows. Every thread of the block takes part in the staging and its barriers.
template <int kD, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_visible_key(const Operands<scalar_t>& a, int64_t b, int64_t h, int64_t l0,
                                                     int64_t l, Visit&& visit) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kT = kTile<kD>;
  __shared__ acc_t ks[kT * kD], vs[kT * kD];
  const int64_t L = a.vis.L, reach = a.P + a.vis.end(smaller(L, l0 + kThreads) - 1);  // the block's last key + 1
  for (int64_t t0 = 0; t0 < reach; t0 += kT) {
    const int n = static_cast<int>(smaller(kT, reach - t0));
    __syncthreads();  // the previous tile is consumed
    stage<kD>(ks, n, a.D, [&](int i, int d) { return key_at(a.pk, a.k, a.P, b, h, t0 + i, d); });
    stage<kD>(vs, n, a.D, [&](int i, int d) { return key_at(a.pv, a.v, a.P, b, h, t0 + i, d); });
    __syncthreads();
    if (l >= L) continue;
#pragma unroll 1
    for (int i = 0; i < n; ++i) {  // one key at a time: the code stays small (fast to compile) and in registers
      const int64_t j = t0 + i;
      if (j < a.P || a.vis.sees(b, l, j - a.P)) visit(j, ks + i * kD, vs + i * kD);
    }
  }
}

template <typename scalar_t, int kD>
void launch_forward(dim3 grid, cudaStream_t stream, const Operands<scalar_t>& a, Strided<scalar_t> out,
                    acc_of<scalar_t>* lse);

template <typename scalar_t, int kD>
void launch_grad_q(dim3 grid, cudaStream_t stream, const Operands<scalar_t>& a, Strided<const scalar_t> dout,
                   Strided<const scalar_t> out, const acc_of<scalar_t>* lse, Strided<scalar_t> dq,
                   acc_of<scalar_t>* delta);

template <typename scalar_t, int kD>
void launch_grad_kv(dim3 grid, cudaStream_t stream, const Operands<scalar_t>& a, Strided<const scalar_t> dout,
                    const acc_of<scalar_t>* lse, const acc_of<scalar_t>* delta, Strided<scalar_t> dk,
                    Strided<scalar_t> dv, acc_of<scalar_t>* dpk, acc_of<scalar_t>* dpv);

// X(scalar_t, kD) for every dtype and head-dim bucket the kernels are built for: float32, float16, bfloat16 (float64,
// which is for checking, takes the dense path) times 64, 128, 256.
#define PEFTOPS_PREFIX_FOR_EACH(X)                                                        \
  X(float, 64) X(float, 128) X(float, 256) X(at::Half, 64) X(at::Half, 128) X(at::Half, 256) \
  X(at::BFloat16, 64) X(at::BFloat16, 128) X(at::BFloat16, 256)

}  // namespace peftops::prefix::cuda
