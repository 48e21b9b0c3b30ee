// prefix_attention on CUDA (KERNELS.md, "Prefix attention"): tiled online-softmax kernels over the keys
// [prefix | the row's own], with the shared prefix read in place from its one [Hkv, P, D] tensor by every batch row
// (through L2: never expanded or copied per row). The two segments are one online softmax, which is their LSE merge
// done key by key. One thread per query row (forward, dq) or per key (dk, dv); the tiles of keys or query rows that a
// block's threads share are staged in shared memory in float32, zero-padded to the head-dim bucket kD so that every
// loop over the head dim is unrolled into registers (keys and rows go one at a time, which keeps the code small). No
// [L, P + S] matrix exists, forward or backward: backward recomputes p = exp(z - lse) from the saved merged LSE
// (FlashAttention's formulas), and the shared prefix's gradients are per-batch-row partials summed once. CUDA cores,
// not tensor cores: a first tiled kernel, checked on a GPU against the reference and against the dense path
// (PEFTOPS_PREFIX_DENSE=1), which float64 also takes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../prefix_attention.h"
#include "../visible.h"

namespace peftops::prefix::cuda {
namespace {

using Tensor = at::Tensor;

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
Strided<T> strided(const Tensor& t, T* data) {
  if (t.dim() == 3) return {data, 0, t.stride(0), t.stride(1), t.stride(2)};
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
struct Operands {
  Strided<const scalar_t> q, k, v, pk, pv;
  Visible vis;
  int64_t Hkv, G, P, D;
  double scale;
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

// Element d of key j of batch row b and kv head h in [prefix | sequence], each read through its own strides.
template <typename scalar_t>
__device__ __forceinline__ scalar_t key_at(const Strided<const scalar_t>& prefix, const Strided<const scalar_t>& seq,
                                           int64_t P, int64_t b, int64_t h, int64_t j, int64_t d) {
  return j < P ? prefix.at(b, h, j, d) : seq.at(b, h, j - P, d);
}

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

// Backward, per key of [prefix | sequence]: dv_j = sum p dO and dk_j = scale sum ds q over the query rows (of the G
// query heads of kv head h) that see key j. Sequence keys go to dk, dv; prefix keys to per-batch-row partials
// [B, Hkv, P, D] in acc_t. Grid (key blocks, Hkv, B).
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
        axpy(gv, p, dos + i * kD);
        axpy(gk, p * (dot(vr, dos + i * kD) - delta_s[i]) * scale, qs + i * kD);
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

// float32, float16 and bfloat16 (float64, which is for checking, takes the dense path).
#define PEFTOPS_PREFIX_CASES(...)                  \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

// The head-dim bucket: every D in [1, 256] runs as the next of 64, 128 or 256, zero-padded.
template <typename F>
void with_head_dim_bucket(int64_t D, F&& f) {
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

template <typename scalar_t>
Operands<scalar_t> operands(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                            const Visible& vis, const Shapes& s) {
  return {strided(q, q.const_data_ptr<scalar_t>()),
          strided(k, k.const_data_ptr<scalar_t>()),
          strided(v, v.const_data_ptr<scalar_t>()),
          strided(pk, pk.const_data_ptr<scalar_t>()),
          strided(pv, pv.const_data_ptr<scalar_t>()),
          vis,
          s.Hkv,
          s.G,
          s.P,
          s.D,
          s.scale};
}

// [B, H, n, D] laid out as [B, n, H, D] (SDPA's layout, which the fake kernels promise).
Tensor sdpa_layout(const Tensor& like, int64_t H, int64_t n) {
  return at::empty({like.size(0), n, H, like.size(3)}, like.options()).transpose(1, 2);
}

dim3 grid(int64_t rows, int64_t heads, int64_t batch) {
  TORCH_CHECK_VALUE(heads <= 65535 && batch <= 65535, "prefix_attention: CUDA takes at most 65535 heads and batch "
                    "rows, got ", heads, " and ", batch);
  return dim3(static_cast<unsigned>((rows + kThreads - 1) / kThreads), static_cast<unsigned>(heads),
              static_cast<unsigned>(batch));
}

const bool* mask_data(const std::optional<Tensor>& mask, Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.const_data_ptr<bool>();
}

}  // namespace

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                                   const Tensor& pv, const std::optional<Tensor>& attn_mask, bool is_causal,
                                   const Shapes& s) {
  c10::cuda::CUDAGuard guard(q.device());
  Tensor mask_holder;
  const Visible vis{s.L, s.S, is_causal, mask_data(attn_mask, mask_holder)};
  auto out = sdpa_layout(q, s.Hq, s.L);
  auto lse = at::empty({s.B, s.Hq, s.L}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_SWITCH(q.scalar_type(), "prefix_attention_cuda_forward", PEFTOPS_PREFIX_CASES([&] {
    with_head_dim_bucket(s.D, [&](auto kD) {
      forward_kernel<scalar_t, decltype(kD)::value>
          <<<grid(s.L, s.Hq, s.B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              operands<scalar_t>(q, k, v, pk, pv, vis, s), strided(out, out.data_ptr<scalar_t>()),
              lse.data_ptr<at::opmath_type<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& pk, const Tensor& pv,
                                                            const Tensor& out, const Tensor& lse,
                                                            const std::optional<Tensor>& attn_mask, bool is_causal,
                                                            const Shapes& s) {
  c10::cuda::CUDAGuard guard(q.device());
  Tensor mask_holder;
  const Visible vis{s.L, s.S, is_causal, mask_data(attn_mask, mask_holder)};
  const auto acc = at::toOpMathType(q.scalar_type());
  auto dq = sdpa_layout(q, s.Hq, s.L), dk = sdpa_layout(k, s.Hkv, s.S), dv = sdpa_layout(k, s.Hkv, s.S);
  // the prefix's gradients per batch row: a per-row prefix's own, a shared one's partials (summed below)
  auto dpk = at::zeros({s.B, s.Hkv, s.P, s.D}, q.options().dtype(acc)), dpv = at::zeros_like(dpk);
  if (q.numel() == 0) {  // no query row: nothing reaches the keys
    dk.zero_();
    dv.zero_();
  } else {
    const auto lse_c = lse.to(acc).contiguous();
    auto delta = at::empty({s.B, s.Hq, s.L}, lse_c.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_SWITCH(q.scalar_type(), "prefix_attention_cuda_backward", PEFTOPS_PREFIX_CASES([&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto a = operands<scalar_t>(q, k, v, pk, pv, vis, s);
      const auto dout = strided(grad_out, grad_out.const_data_ptr<scalar_t>());
      with_head_dim_bucket(s.D, [&](auto kD) {
        constexpr int D = decltype(kD)::value;
        grad_q_kernel<scalar_t, D><<<grid(s.L, s.Hq, s.B), kThreads, 0, stream>>>(
            a, dout, strided(out, out.const_data_ptr<scalar_t>()), lse_c.const_data_ptr<acc_t>(),
            strided(dq, dq.data_ptr<scalar_t>()), delta.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_kv_kernel<scalar_t, D><<<grid(s.P + s.S, s.Hkv, s.B), kThreads, 0, stream>>>(
            a, dout, lse_c.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), strided(dk, dk.data_ptr<scalar_t>()),
            strided(dv, dv.data_ptr<scalar_t>()), dpk.data_ptr<acc_t>(), dpv.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }));
  }
  const auto dt = q.scalar_type();
  const auto reduce = [&](const Tensor& g) { return (pk.dim() == 3 ? g.sum(0) : g).to(dt).contiguous(); };
  return {dq, dk, dv, reduce(dpk), reduce(dpv)};
}

}  // namespace peftops::prefix::cuda
